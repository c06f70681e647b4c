"""Recovery, checkpoints and winning space back: the part of the store that looks at all of it.

Owns: rebuilding a store's state from its checkpoint and the journal after it, the snapshot a
checkpoint writes, the lowest journal seq still needed, and relocating the few calls that pin
old segments. These are functions of a ``Store`` and read and write its private state: this
module is part of pmq.store, split from it to keep both readable. Must not: be used by anything
but pmq.store.

Invariants (with pmq.store's):
- Recovery replays the records after the checkpoint in journal order, so memory ends as it was
  when the last durable record was written; a call that was running when the process died is
  counted as a crash.
- The floor never rises past a record that the durable checkpoint does not summarise.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from array import array
from collections import deque
from typing import TYPE_CHECKING, Any

import msgpack

from pmq._calls import K_ATTEMPT, K_CALL, K_DEAD, K_DONE, K_FAIL, K_PURGE, K_REVIVE
from pmq._checkpoint import read_checkpoint
from pmq._links import K_LINK
from pmq.errors import JournalCorruption

if TYPE_CHECKING:
    from pmq.store import Store

__all__ = ["apply_record", "floor", "recover", "relocate_stragglers", "snapshot"]

log = logging.getLogger("pmq.store")

RELOCATE_MAX = 10_000  # a head segment pinned by at most this many calls gets them copied forward


def recover(store: Store) -> None:
    state = read_checkpoint(store.directory)
    journal = store.journal
    live: dict[int, tuple[str, bool]] = {}  # key -> (queue, outbound)
    start = journal.floor
    if state is not None:
        if state["journal_id"] != journal.journal_id:
            raise JournalCorruption("checkpoint belongs to another journal",
                                    os.path.join(store.directory, "checkpoint"), 0)
        if state["covered"] >= journal.next_seq or state["covered"] + 1 < journal.floor:
            raise JournalCorruption(
                f"checkpoint covers seq {state['covered']}, but the journal holds "
                f"{journal.floor}..{journal.next_seq - 1}",
                os.path.join(store.directory, "checkpoint"), 0)
        start = state["covered"] + 1
        for name, is_out, keys, size in state["queues"]:
            store._queue(name, is_out).bytes = size
            for key in array("q", keys):
                live[key] = (name, is_out)
        store._attempts = _pairs(state["attempts"])
        store._crashes = _pairs(state["crashes"])
        store._open = _pairs(state["open"])
        store._moved = _pairs(state["moved"])
        store._dead = {int(k): v for k, v in state["dead"].items()}
        store._ids = {(s, u): [k, e, done] for s, u, k, e, done in state["ids"]}
        store._user_calls = {k: ident for ident, (k, _, done) in store._ids.items() if not done}
        store._links.restore(state.get("links", []))
    for seq, payload in journal.replay(start):
        apply_record(store, seq, msgpack.unpackb(payload, raw=False), live)
    for key in store._open:
        store._crashes[key] = store._crashes.get(key, 0) + 1
        log.warning("call %s%d was running when the process stopped: counted as a crash",
                    store._id_prefix, key)
    store._open = {}
    by_queue: dict[tuple[str, bool], list[int]] = {}
    for key, qkey in live.items():
        by_queue.setdefault(qkey, []).append(key)
    for (name, is_out), keys in by_queue.items():
        store._queue(name, is_out).pending = deque(sorted(keys))
    now = time.time()
    store._ids = {k: v for k, v in store._ids.items() if v[1] > now}
    store._user_calls = {k: ident for k, ident in store._user_calls.items()
                        if k in live or k in store._dead}
    if live or store._dead:
        log.info("store %s: %d pending calls, %d dead letters", store.directory, len(live),
                 len(store._dead))



def apply_record(store: Store, seq: int, record: list[Any],
                 live: dict[int, tuple[str, bool]]) -> None:
    kind = record[0]
    if kind == K_CALL:
        key = record[1]
        if key == seq:
            live[key] = (record[2], record[3])
            if record[3]:
                store._queue(record[2], True).bytes += len(record[7])
            ident = None
            if record[4] is not None:
                ident = (record[10], record[4])
            elif record[3] and len(record) > 11:  # a replayed outbound call keeps its id
                ident = (record[10], record[11])
            if ident is not None:
                entry = store._ids.get(ident)
                expiry = entry[1] if entry is not None else record[9] + store.retention
                store._ids[ident] = [key, expiry, False]
                store._user_calls[key] = ident
        elif key in live or key in store._dead:
            store._moved[key] = seq  # a relocated copy of a call still pending
    elif kind == K_ATTEMPT:
        flat = record[1]
        for key, attempt in zip(flat[::2], flat[1::2], strict=True):
            if key in store._open:
                store._crashes[key] = store._crashes.get(key, 0) + 1
            store._open[key] = attempt
            store._attempts[key] = attempt
    elif kind == K_FAIL:
        flat = record[1]
        for key, attempt in zip(flat[::2], flat[1::2], strict=True):
            store._open.pop(key, None)
            store._attempts[key] = attempt
    elif kind == K_DONE:
        for key in record[1]:
            where = live.pop(key, None)
            store._drop_counters(key)
            store._moved.pop(key, None)
            store._completed(key, where is not None and where[1])
        freed = record[2]
        for name, size in zip(freed[::2], freed[1::2], strict=True):
            store._queue(name, True).bytes -= size
    elif kind == K_DEAD:
        key = record[1]
        if live.pop(key, None) is not None:
            if record[3]:
                store._queue(record[2], True).bytes -= record[7]
            store._dead[key] = [record[2], record[3], record[4], record[5], record[6],
                               store._attempts.get(key, 0), record[7]]
            store._drop_counters(key)
    elif kind == K_REVIVE:
        entry = store._dead.pop(record[1], None)
        if entry is not None:
            live[record[1]] = (entry[0], entry[1])
            if entry[1]:
                store._queue(entry[0], True).bytes += entry[6]
    elif kind == K_PURGE:
        store._dead.pop(record[1], None)
        store._moved.pop(record[1], None)
        store._user_calls.pop(record[1], None)
    elif kind == K_LINK:
        store._links.apply(record)



def snapshot(store: Store, covered: int) -> dict[str, Any]:
    queues: list[list[Any]] = []
    taken: dict[tuple[str, bool], list[int]] = {}
    # A taken call carries its own counters (Store._hand_out): merge them with the waiting ones.
    attempts, crashes, opened = dict(store._attempts), dict(store._crashes), dict(store._open)
    for call in store._taken.values():
        taken.setdefault((call.queue, call.outbound), []).append(call.key)
        if call.attempt:
            attempts[call.key] = call.attempt
        if call.crashes:
            crashes[call.key] = call.crashes
        if call.attempt_open:
            opened[call.key] = call.attempt
    for qkey, queue in store._queues.items():
        # This runs under the lock that every enqueue needs: a backlog of a million calls in
        # key order is copied by array() at C speed, and sorted only when it must be.
        keys = array("q", queue.pending)
        extra = taken.get(qkey)
        if not queue.sorted:
            keys = array("q", sorted([*keys, *(extra or ())]))
        elif extra:
            # Calls taken are usually the queue's oldest: put them in front rather than sort
            # the whole backlog under the lock (a tenth of a second per million calls).
            extra.sort()
            if not keys or extra[-1] < keys[0]:
                keys = array("q", extra) + keys
            else:
                keys = array("q", sorted([*keys, *extra]))
        queues.append([qkey[0], qkey[1], keys.tobytes(), queue.bytes])
    now = time.time()
    return {
        "journal_id": store.journal.journal_id,
        "covered": covered,
        "queues": queues,
        "attempts": _flat(attempts),
        "crashes": _flat(crashes),
        "open": _flat(opened),
        "moved": _flat(store._moved),
        "dead": store._dead,
        "ids": [[s, u, k, e, done] for (s, u), (k, e, done) in store._ids.items() if e > now],
        "links": store._links.snapshot(),
    }



def floor(store: Store, covered: int) -> int:
    """The lowest seq still needed: records after the checkpoint, and live calls' records."""
    floor = covered + 1
    for queue in store._queues.values():
        if queue.pending:
            floor = min(floor, queue.pending[0] if queue.sorted else min(queue.pending))
    for key in itertools.chain(store._taken, store._dead):
        floor = min(floor, key)
    if store._moved:
        floor = covered + 1
        for queue in store._queues.values():
            for key in queue.pending:
                floor = min(floor, store._moved.get(key, key))
        for key in itertools.chain(store._taken, store._dead):
            floor = min(floor, store._moved.get(key, key))
    return floor



def relocate_stragglers(store: Store) -> None:
    """Copy the few live calls that pin the oldest segment to the end of the journal."""
    segments = store.journal.segments()
    if len(segments) < 3:
        return
    boundary = segments[1].base_seq
    with store._lock:
        live: list[int] = []
        moved = store._moved
        for queue in store._queues.values():
            # Under the lock every enqueue needs: a queue in key order is read only up to
            # the boundary (copies only ever move forward), and not at all once there are
            # too many to relocate, so a large backlog costs next to nothing here.
            for key in queue.pending:
                if key >= boundary and queue.sorted:
                    break
                if moved.get(key, key) < boundary:
                    live.append(key)
                    if len(live) > RELOCATE_MAX:
                        return
        live += [k for k in itertools.chain(store._taken, store._dead)
                 if moved.get(k, k) < boundary]
        if not live or len(live) > RELOCATE_MAX:
            return
        old = {store._moved.get(k, k): k for k in live}
        mapping = store.journal.copy_forward(old)
        for old_seq, new_seq in mapping.items():
            store._moved[old[old_seq]] = new_seq
        store.counters["relocated"] += len(mapping)




def _flat(mapping: dict[int, int]) -> bytes:
    return array("q", itertools.chain.from_iterable(mapping.items())).tobytes()


def _pairs(data: bytes) -> dict[int, int]:
    values = array("q", data)
    return dict(zip(values[::2], values[1::2], strict=True))
