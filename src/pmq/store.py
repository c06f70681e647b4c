"""Queue state on the journal: local and outbound queues, attempts, dead letters, user ids.

Owns: what a call *is* on disk (records in the journal, a checkpoint beside it), which calls are
pending where, how many attempts and crashes each has had, the dead letters, the user-id window,
and winning space back. Must not: know about sockets, frames, threads that run handlers, or
timing policy (the dispatcher decides when a call runs; the store records what happened).

Invariants:
- A call's key is the journal seq of the record that created it; the record carries the key,
  so a copy moved forward by relocation is still the same call.
- Every record is appended under ``_lock`` together with the in-memory change it describes, so
  memory and journal agree in order; callers wait for durability outside the lock (group commit).
- A call is handed out by ``take`` only once its record is durable (written, in the weaker
  durability modes): nothing runs that a crash could make unhappen.
- ATTEMPT is appended, and the dispatcher waits for it to be durable, before a handler starts: a
  process that dies inside a handler is counted as a crash on the next start.
- Memory holds keys and a few counters per pending call, not payloads: payloads of recent calls
  sit in a bounded cache, others are read back from the journal when they are taken.
- The journal's floor only rises past records that a durable checkpoint no longer needs.
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from typing import Any, TypeVar

import msgpack

from pmq import _recovery
from pmq._calls import (
    K_ATTEMPT,
    K_CALL,
    K_DEAD,
    K_DONE,
    K_FAIL,
    K_PURGE,
    K_REVIVE,
    CallIds,
    CallStatus,
    DeadLetter,
    NewCallFields,
    Queue,
    StoredCall,
)
from pmq._checkpoint import write_checkpoint
from pmq._journal import Journal
from pmq._links import Links
from pmq.errors import JournalCorruption, QueueFull

__all__ = ["Store"]

log = logging.getLogger("pmq.store")

_Call = TypeVar("_Call", bound=StoredCall)

# Of a NewCall, by position: the proxy makes plain tuples in NewCall's order (see NewCall).
_USER_ID = operator.itemgetter(5)
_ROUTE = operator.itemgetter(0, 1)  # (queue, outbound)
_ARGUMENTS = operator.itemgetter(4)
_KEY = operator.attrgetter("key")
_OUTBOUND = operator.attrgetter("outbound")
_ORIGIN = operator.attrgetter("origin")
_WIRE_USER_ID = operator.itemgetter(4)  # of a protocol.WireCall
_WIRE_NAMES = operator.itemgetter(1, 2)  # (module, method) of a protocol.WireCall
_FIELD_ARGUMENTS = operator.itemgetter(7)  # of a CALL record
_TUPLES = {tuple}
_BYTES = {bytes}
_unpack_record = functools.partial(msgpack.unpackb, raw=False, use_list=False)
_unpackb = msgpack.unpackb


def _cached_bytes(entry: bytes | tuple[Any, ...]) -> int:
    """What a cache entry counts against the cache's limit."""
    if isinstance(entry, bytes):
        return len(entry) + CACHE_ENTRY_BYTES
    return len(entry[7]) + CACHE_OVERHEAD_BYTES
_CALL_HEAD = b"\x9b\x01"  # msgpack: an array of 11 items, the first K_CALL
_NIL = b"\xc0"  # msgpack: None (the user id of a call without one)
TRANSMITTED = 2  # the "done" flag of a user id whose call was sent to (and accepted by) a peer
RECENT_DONE = 100_000  # completed keys remembered for call_status (memory only)
CACHE_OVERHEAD_BYTES = 160  # what a cached record takes beyond its arguments (list, floats, ints)
CACHE_ENTRY_BYTES = 100  # what a cached encoded record takes beyond its bytes (object, dict slot)
DETAIL_MAX_CHARS = 16_384
RELOCATE_MAX = 10_000  # a head segment pinned by at most this many calls gets them copied forward


_popleft = deque.popleft


class Store:
    """Durable queue state of one cage in `directory` (a journal and a checkpoint).

    Args:
        directory: the cage's data directory.
        cage_name: this cage's name (it prefixes automatic call ids).
        durability, segment_bytes: passed to the journal.
        retention: seconds a user id is remembered after its call was made (DESIGN.md §2).
        cache_bytes: payloads of recent calls kept in memory; others are read back from disk.
        checkpoint_bytes: journal growth after which ``maintain`` writes a checkpoint.

    Raises:
        JournalLocked: another process has the directory open.
        JournalCorruption: the journal or the checkpoint is damaged.
    """

    def __init__(self, directory: str, cage_name: str, *, durability: str = "always",
                 segment_bytes: int = 64 << 20, retention: float = 259_200.0,
                 cache_bytes: int = 64 << 20, checkpoint_bytes: int = 64 << 20,
                 checkpoint_interval: float = 60.0) -> None:
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.cage_name = cage_name
        self.retention = retention
        self.journal = Journal(os.path.join(self.directory, "journal"),
                               durability=durability,  # type: ignore[arg-type]  # checked by Journal
                               segment_bytes=segment_bytes)
        self._always = durability == "always"
        self._id_prefix = f"{cage_name}:{self.journal.journal_id.hex()[:8]}:"
        self._lock = threading.Lock()
        self._packer = msgpack.Packer(use_bin_type=True)  # used under _lock only
        self._queues: dict[tuple[str, bool], Queue] = {}  # (name, outbound) -> queue
        self._taken: dict[int, StoredCall] = {}  # handed out, not finished
        self._attempts: dict[int, int] = {}  # sparse: attempts started
        self._crashes: dict[int, int] = {}  # sparse: attempts that died with the process
        self._open: dict[int, int] = {}  # attempts started and not yet finished
        self._moved: dict[int, int] = {}  # key -> seq of its relocated copy
        # key -> [queue, outbound, reason, detail, at, attempts, argument bytes]
        self._dead: dict[int, list[Any]] = {}
        # (source, user id) -> [key, expiry, completed]; and the not-yet-completed ones by key
        self._ids: dict[tuple[str, str], list[Any]] = {}
        self._user_calls: dict[int, tuple[str, str]] = {}
        # completed key -> was outbound (a bool), or the id of a call accepted from a peer:
        # plain dicts of ints, bools and strs, which the garbage collector does not track (an
        # OrderedDict of 100,000 cost each full collection milliseconds). Two generations of up
        # to RECENT_DONE each: when the young one is full it becomes the old one and the old
        # one is dropped, so forgetting costs nothing per call (trimming one dict copied
        # 100,000 entries every 25,000 calls).
        self._recent: dict[int, bool | str] = {}
        self._recent_old: dict[int, bool | str] = {}
        self._links = Links()  # acceptance state per source journal (exactly-once)
        # key -> the decoded CALL record: taking a recent call needs no decoding, which was the
        # largest cost of sending and running calls. Tuples, not lists: the garbage collector
        # stops tracking a tuple of plain values, and a backlog of tracked lists made every
        # full collection walk all of them (10% of a receiving cage's time, measured).
        # key -> the call's CALL record: encoded (bytes) for calls made here, whose records
        # exist anyway (a decoded tuple per call cost transactions a sixth of their time), or
        # decoded (a tuple) for calls accepted from peers, whose tuples exist anyway.
        self._cache: dict[int, bytes | tuple[Any, ...]] = {}
        self._cache_bytes = 0
        self._cache_limit = cache_bytes
        self._checkpoint_bytes = checkpoint_bytes
        self._checkpoint_interval = checkpoint_interval
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self.counters = dict.fromkeys(("enqueued", "duplicates", "attempts", "completed",
                                       "failed", "dead", "revived", "purged", "relocated",
                                       "accepted", "refused"), 0)
        try:
            _recovery.recover(self)
        except BaseException:
            self.journal.close()
            raise

    # ---- making calls --------------------------------------------------------------------

    def enqueue(self, calls: list[NewCallFields],
                limit: Callable[[str], tuple[int, int]] | None = None
                ) -> tuple[Sequence[str], int]:
        """Append `calls` in one journal frame; return their ids and the seq to wait for.

        A call whose user id was already accepted from the same source within the retention
        window is not stored again: its id is returned and nothing else happens. The caller
        must wait for the returned seq (``journal.sync``) before telling anyone the calls exist.

        Raises:
            QueueFull: an outbound queue is over `limit(queue)` = (max calls, max bytes).
        """
        now = time.time()
        with self._lock:
            seq = self.journal.next_seq
            ids: Sequence[str]
            if any(map(_USER_ID, calls)):
                ids, fresh, records = self._encode_with_ids(calls, seq, now)
                if not records:
                    return ids, 0
            else:
                fresh = calls
                records = self._encode_plain(calls, seq, now)
                ids = CallIds(self._id_prefix, seq, len(calls))
            if limit is not None:
                self._check_limits(fresh, limit)
            last = (self.journal.append(records[0]) if len(records) == 1
                    else self.journal.append_many(records))
            assert last == seq + len(records) - 1, "store appends must be serialised"
            self._index(fresh, records, seq, now)
            return ids, last

    def _encode_plain(self, calls: list[NewCallFields], seq: int, now: float) -> list[bytes]:
        """K_CALL records of calls without user ids (keys seq, seq + 1, ...).

        Transactions of thousands of calls spend more time here than in their fsync, so the
        parts that repeat from one call to the next (the queue, module, method, deadline and
        source, usually the very same str objects) are packed once per run of equal calls and
        joined around each call's key and arguments: the same msgpack array as packing the
        whole list, at half the cost.
        """
        pack = self._packer.pack
        records: list[bytes] = []
        append = records.append
        join = b"".join
        pq: object = None
        pm = pf = pd = pout = psrc = pq
        mid = tail = b""
        for key, (q, out, m, f, a, _, d, src) in enumerate(calls, seq):
            if q is not pq or m is not pm or f is not pf or d is not pd or out is not pout or (
                    src is not psrc):
                pq, pout, pm, pf, pd, psrc = q, out, m, f, d, src
                mid = pack(q) + pack(out) + _NIL + pack(m) + pack(f)
                tail = pack(d) + pack(now) + pack(src)
            append(join((_CALL_HEAD, pack(key), mid, pack(a), tail)))
        return records

    def _encode_with_ids(self, calls: list[NewCallFields], seq: int,
                         now: float) -> tuple[list[str], list[NewCallFields], list[bytes]]:
        """Records for `calls`, leaving out those whose user id was seen (under _lock)."""
        pack = self._packer.pack
        prefix = self._id_prefix
        records: list[bytes] = []
        ids: list[str] = []
        fresh: list[NewCallFields] = []
        claimed: set[tuple[str, str]] = set()
        for call in calls:
            queue, outbound, module, method, arguments, user_id, deadline, source = call
            key = seq + len(records)
            if user_id is None:
                ids.append(prefix + str(key))
            else:
                ident = (source, user_id)
                known = self._ids.get(ident)
                ids.append(user_id)
                if (known is not None and known[1] > now) or ident in claimed:
                    self.counters["duplicates"] += 1
                    continue
                claimed.add(ident)
            records.append(pack([K_CALL, key, queue, outbound, user_id, module, method,
                                 arguments, deadline, now, source]))
            fresh.append(call)
        return ids, fresh, records

    def _index(self, fresh: list[NewCallFields], records: list[bytes], seq: int,
               now: float) -> None:
        """Put just-appended calls (keys seq, seq + 1, ...) in their queues, the id window and
        the payload cache (under _lock)."""
        end = seq + len(records)
        routes = set(map(_ROUTE, fresh))
        if len(routes) == 1:
            queue = self._queue(*routes.pop())
            queue.pending.extend(range(seq, end))
            if queue.outbound:
                queue.bytes += sum(map(len, map(_ARGUMENTS, fresh)))
        else:
            for key, (name, outbound, _, _, arguments, _, _, _) in enumerate(fresh, seq):
                queue = self._queue(name, outbound)
                queue.pending.append(key)
                if outbound:
                    queue.bytes += len(arguments)
        if any(map(_USER_ID, fresh)):
            for key, (_, _, _, _, _, user_id, _, source) in enumerate(fresh, seq):
                if user_id is not None:
                    self._ids[(source, user_id)] = [key, now + self.retention, False]
                    self._user_calls[key] = (source, user_id)
        size = sum(map(len, records))
        # The cache is best effort: a batch that does not fit whole is read back from the
        # journal when it runs (a backlog has filled the cache, and its calls wait anyway).
        cached = size + CACHE_ENTRY_BYTES * len(records)
        if self._cache_bytes + cached <= self._cache_limit:
            self._cache.update(zip(range(seq, end), records, strict=True))
            self._cache_bytes += cached
        self._since_checkpoint += size
        self.counters["enqueued"] += len(records)

    def _check_limits(self, fresh: list[NewCallFields],
                      limit: Callable[[str], tuple[int, int]]) -> None:
        adding: dict[str, list[int]] = {}
        routes = set(map(_ROUTE, fresh))
        if len(routes) == 1:  # the common case, counted by C loops
            name, outbound = routes.pop()
            if outbound:
                adding[name] = [len(fresh), sum(map(len, map(_ARGUMENTS, fresh)))]
        else:
            for name, outbound, _, _, arguments, _, _, _ in fresh:
                if outbound:
                    counts = adding.setdefault(name, [0, 0])
                    counts[0] += 1
                    counts[1] += len(arguments)
        for name, (count, size) in adding.items():
            pending = self._count((name, True))
            queue = self._queues.get((name, True))
            pending_bytes = queue.bytes if queue else 0
            max_calls, max_bytes = limit(name)
            if pending + count > max_calls or pending_bytes + size > max_bytes:
                raise QueueFull(name, pending, pending_bytes, max_calls, max_bytes)

    def _count(self, qkey: tuple[str, bool]) -> int:
        queue = self._queues.get(qkey)
        waiting = len(queue.pending) if queue else 0
        return waiting + (queue.taken if queue else 0)

    def _queue(self, name: str, outbound: bool) -> Queue:
        queue = self._queues.get((name, outbound))
        if queue is None:
            queue = self._queues[(name, outbound)] = Queue(name, outbound)
        return queue

    # ---- running calls -------------------------------------------------------------------

    def visible_seq(self) -> int:
        """Calls at or below this seq may be handed out (durable, or written when not 'always')."""
        return self.journal.durable_seq if self._always else self.journal.written_seq

    def take(self, queue_name: str, limit: int, outbound: bool = False,
             kind: type[_Call] = StoredCall,  # type: ignore[assignment]
             appended: bool = False) -> list[_Call]:
        """Hand out up to `limit` of the queue's next calls, oldest first, with their payloads.

        `kind` is the class of the objects made: the dispatcher's subclass carries an attempt's
        state too, so running a call needs no second object.

        Only calls at or below ``visible_seq()`` are handed out, unless `appended` is true:
        then so are calls appended and not yet durable, for a caller that acts on them only
        once a record it appends later (an ATTEMPT) is durable, which makes them durable too.
        A peer's calls then start in the fsync that also acknowledges them, not in the next.
        Never for calls sent to a peer: one sent before it is durable here could be lost here
        and accepted there.
        """
        visible = self.journal.next_seq - 1 if appended else self.visible_seq()
        with self._lock:
            queue = self._queues.get((queue_name, outbound))
            if queue is None or not queue.pending:
                return []
            if not queue.sorted:
                queue.pending = deque(sorted(queue.pending))
                queue.sorted = True
            pending = queue.pending
            moved = self._moved
            count = min(limit, len(pending))
            if count <= 0:
                return []
            if not moved and pending[count - 1] <= visible:
                # The common case, every one of the next `count` keys visible (they are sorted):
                # popped by a C loop, not a Python step per call.
                keys = list(map(_popleft, repeat(pending, count)))
            else:
                keys = []
                while (pending and len(keys) < limit
                       and moved.get(pending[0], pending[0]) <= visible):
                    keys.append(pending.popleft())
                if not keys:
                    return []
            calls = self._hand_out(keys, kind)
            queue.taken += len(calls)
            return calls

    def _hand_out(self, keys: list[int], kind: type[_Call] = StoredCall  # type: ignore[assignment]
                  ) -> list[_Call]:
        """StoredCalls of `keys` (just popped from a queue), registered as taken (under _lock).

        Their attempt and crash counts move from the store's sparse dicts onto the objects.
        """
        records = self._records(keys)
        prefix = self._id_prefix
        if not (self._attempts or self._crashes or self._open):
            calls = list(map(kind, keys, repeat(prefix), records))
        else:
            attempts, crashes, opened = self._attempts, self._crashes, self._open
            calls = []
            for key, fields in zip(keys, records, strict=True):
                call = kind(key, prefix, fields, attempts.pop(key, 0), crashes.pop(key, 0))
                call.attempt_open = opened.pop(key, None) is not None
                calls.append(call)
        self._taken.update(zip(keys, calls, strict=True))
        return calls

    def _records(self, keys: list[int]) -> list[tuple[Any, ...]]:
        """The decoded CALL records of `keys`, in their order: from the cache (which lets them
        go), else read back from the journal.

        The common cases, every record cached and all of one form, run as C loops (this runs
        for every call taken); anything else is sorted out record by record.
        """
        cache = self._cache
        entries: list[Any] = list(map(cache.pop, keys, repeat(None, len(keys))))
        forms = set(map(type, entries))
        if forms == _TUPLES:  # accepted from a peer: decoded already
            self._cache_bytes -= (sum(map(len, map(_FIELD_ARGUMENTS, entries)))
                                  + CACHE_OVERHEAD_BYTES * len(entries))
            return entries
        if forms == _BYTES:  # made here: encoded
            self._cache_bytes -= sum(map(len, entries)) + CACHE_ENTRY_BYTES * len(entries)
            # A comprehension, not map() over the functools.partial: a partial with keywords
            # makes a dict per call (300 -> 215 ns a record).
            return [_unpackb(entry, raw=False, use_list=False) for entry in entries]
        missing: dict[int, int] = {}  # seq -> index in keys
        for index, (key, entry) in enumerate(zip(keys, entries, strict=True)):
            if entry is None:
                missing[self._moved.get(key, key)] = index
            elif isinstance(entry, bytes):
                self._cache_bytes -= len(entry) + CACHE_ENTRY_BYTES
                entries[index] = _unpack_record(entry)
            else:
                self._cache_bytes -= len(entry[7]) + CACHE_OVERHEAD_BYTES
        if missing:
            seqs = sorted(missing)
            for run in _runs(seqs, gap=4096):
                for seq, payload in self.journal.replay(run[0], run[-1] + 1):
                    if seq in missing:
                        entries[missing[seq]] = _unpack_record(payload)
            lost = [keys[missing[s]] for s in seqs if entries[missing[s]] is None]
            if lost:
                raise JournalCorruption(
                    f"calls {lost[:5]} are pending but their records are not in the journal",
                    self.journal.directory, 0)
        return entries

    def _payloads(self, keys: list[int]) -> dict[int, tuple[Any, ...]]:
        """``_records`` by key."""
        return dict(zip(keys, self._records(keys), strict=True))

    def begin_attempts(self, calls: Sequence[StoredCall]) -> int:
        """Record that `calls` are about to run; return the seq to wait for before running them."""
        if not calls:
            return 0
        flat: list[int] = []
        with self._lock:
            for call in calls:
                call.attempt += 1
                call.attempt_open = True
                flat += (call.key, call.attempt)
            self.counters["attempts"] += len(calls)
            return self._append([K_ATTEMPT, flat])

    def finish(self, done: list[StoredCall], failed: list[StoredCall]) -> int:
        """Record completed and failed attempts (one record each); return the seq appended.

        Completion need not be waited for: if it is lost in a crash the call runs again, the
        one documented case of a repeated execution (DESIGN.md §2).
        """
        seq = 0
        with self._lock:
            if done:
                freed: dict[str, int] = {}
                # _forget and _completed, spelled out: this loop runs for every call executed.
                # A taken call's counters live on it (see _hand_out) and its cached payload
                # went when it was taken, so only strays need the dicts below.
                taken, queues, moved = self._taken, self._queues, self._moved
                user_calls = self._user_calls
                strays = self._attempts or self._crashes or self._open or self._cache
                for call in done:
                    key = call.key
                    if taken.pop(key, None) is not None:
                        queues[(call.queue, call.outbound)].taken -= 1
                    elif strays:
                        self._drop_counters(key)
                    if moved:
                        moved.pop(key, None)
                    if user_calls:
                        self._completed_user_call(key, call.outbound)
                    if call.outbound:
                        freed[call.queue] = freed.get(call.queue, 0) + len(call.arguments)
                self._remember_done(done)
                for name, size in freed.items():
                    self._queues[(name, True)].bytes -= size
                seq = self._append([K_DONE, [c.key for c in done],
                                    list(itertools.chain.from_iterable(freed.items()))])
                self.counters["completed"] += len(done)
            if failed:
                flat: list[int] = []
                for call in failed:
                    call.attempt_open = False
                    flat += (call.key, call.attempt)
                seq = self._append([K_FAIL, flat])
                self.counters["failed"] += len(failed)
        return seq

    def give_back(self, calls: Iterable[StoredCall]) -> None:
        """Return handed-out calls to the front of their queues (a stop, or a retry that is due)."""
        with self._lock:
            for call in calls:
                if self._taken.pop(call.key, None) is None:
                    continue
                queue = self._queue(call.queue, call.outbound)
                queue.taken -= 1
                queue.pending.appendleft(call.key)
                queue.sorted = False
                self._park_counters(call)

    def bury(self, call: StoredCall, reason: str, detail: str = "") -> int:
        """Move `call` to the dead letters with `reason`; return the seq appended."""
        detail = detail[-DETAIL_MAX_CHARS:]
        now = time.time()
        with self._lock:
            attempts = max(call.attempt, self._attempts.get(call.key, 0))
            self._untake(call)
            self._drop_counters(call.key)
            size = len(call.arguments)
            if call.outbound:
                self._queues[(call.queue, True)].bytes -= size
            self._dead[call.key] = [call.queue, call.outbound, reason, detail, now, attempts, size]
            self.counters["dead"] += 1
            return self._append([K_DEAD, call.key, call.queue, call.outbound, reason, detail, now,
                                 size])

    def _park_counters(self, call: StoredCall) -> None:
        """A taken call goes back to waiting: its counters go back to the sparse dicts."""
        key = call.key
        if call.attempt:
            self._attempts[key] = call.attempt
        if call.crashes:
            self._crashes[key] = call.crashes
        if call.attempt_open:
            self._open[key] = call.attempt

    def _remember_done(self, done: list[StoredCall]) -> None:
        """Remember completed calls for ``status`` (the last RECENT_DONE or more of them), by
        key: whether it went to a peer, or for a call accepted from a peer its id there (looked
        for among the values when asked: hashing every such id as a key cost a receiving cage
        0.4 µs per call)."""
        recent = self._recent
        if not any(map(_ORIGIN, done)):  # made here
            recent.update(zip(map(_KEY, done), map(_OUTBOUND, done), strict=True))
        elif all(map(_ORIGIN, done)) and not any(map(_OUTBOUND, done)):  # from peers
            recent.update(zip(map(_KEY, done), map(_ORIGIN, done), strict=True))
        else:
            recent.update((call.key, call.outbound if call.origin is None or call.outbound
                           else call.origin) for call in done)
        if len(recent) >= RECENT_DONE:
            self._recent_old, self._recent = recent, {}

    def _completed(self, key: int, outbound: bool = False) -> None:
        recent = self._recent
        recent[key] = outbound
        if len(recent) >= RECENT_DONE:
            self._recent_old, self._recent = recent, {}
        self._completed_user_call(key, outbound)

    def _completed_user_call(self, key: int, outbound: bool) -> None:
        ident = self._user_calls.pop(key, None)
        if ident is not None:
            entry = self._ids.get(ident)
            if entry is not None and entry[0] == key:
                entry[2] = TRANSMITTED if outbound else True

    def _untake(self, call: StoredCall) -> None:
        if self._taken.pop(call.key, None) is not None:
            self._queues[(call.queue, call.outbound)].taken -= 1

    def _forget(self, call: StoredCall) -> None:
        self._untake(call)
        self._drop_counters(call.key)
        self._moved.pop(call.key, None)

    def _drop_counters(self, key: int) -> None:
        self._attempts.pop(key, None)
        self._crashes.pop(key, None)
        self._open.pop(key, None)
        entry = self._cache.pop(key, None)
        if entry is not None:
            self._cache_bytes -= _cached_bytes(entry)

    def _append(self, record: list[Any]) -> int:
        payload = self._packer.pack(record)
        self._since_checkpoint += len(payload)
        return self.journal.append(payload)

    # ---- between cages ---------------------------------------------------------------------

    def link_state(self, source: str, journal_id: bytes) -> tuple[int, list[tuple[int, str]]]:
        """(high, unconfirmed refusals) of the link from `source`'s journal: what to ack."""
        with self._lock:
            return (self._links.high(source, journal_id),
                    self._links.refusals(source, journal_id))

    def accept(self, source: str, journal_id: bytes, calls: Iterable[Any], settled: int,
               refuse: Callable[[str, str], str | None]
               ) -> tuple[int, int, list[tuple[int, str]]]:
        """Store the calls a peer sent (exactly once) with the link's new state, in one frame.

        Args:
            source, journal_id: the sending cage and its journal (the link).
            calls: ``protocol.WireCall``s in key order; those at or below the link's high-water
                mark were accepted before (a redelivery) and are skipped.
            settled: the sender has recorded every acknowledgement up to this key, so refusals
                up to it need not be kept.
            refuse: ``refuse(module, method)`` is a reason to refuse the call, or None.

        Returns:
            (seq to wait for before acknowledging, or 0; the new high-water mark; the refusals
            the sender has not yet confirmed, for the acknowledgement).
        """
        now = time.time()
        prefix = f"{source}:{journal_id.hex()[:8]}:"
        queue_name = f"{source}_queue"
        calls = calls if isinstance(calls, list) else list(calls)
        with self._lock:
            high = start = self._links.high(source, journal_id)
            refused: list[tuple[int, str]] = []
            verdicts = {name: refuse(*name) for name in set(map(_WIRE_NAMES, calls))}
            if (calls and calls[0][0] > high and not any(verdicts.values())
                    and not any(map(_WIRE_USER_ID, calls))):
                fresh = calls  # the common case: all new, all allowed, no user ids
                high = calls[-1][0]
            else:
                fresh = self._accept_one_by_one(source, calls, high, verdicts, refused, now)
                high = max(high, calls[-1][0]) if calls else high
            if high == start and not self._links.prunable(source, journal_id, settled):
                return 0, high, self._links.refusals(source, journal_id)
            seq = self.journal.next_seq
            pack = self._packer.pack
            # One tuple per call is both the record to pack and the cached decoded record.
            fields = [(K_CALL, key, queue_name, False, user_id, module, method, arguments,
                       deadline, created, source, prefix + str(wire_key))
                      for key, (wire_key, module, method, arguments, user_id, deadline, created)
                      in enumerate(fresh, seq)]
            records = list(map(pack, fields))
            records.append(pack(self._links.record(source, journal_id, high, refused, settled)))
            last = self.journal.append_many(records)
            self._queue(queue_name, False).pending.extend(range(seq, seq + len(fields)))
            if fresh is not calls:  # the common case has no user ids
                for record in fields:
                    if record[4] is not None:
                        self._ids[(source, record[4])] = [record[1], now + self.retention, False]
                        self._user_calls[record[1]] = (source, record[4])
            cached = sum(map(len, map(_FIELD_ARGUMENTS, fields))) + CACHE_OVERHEAD_BYTES * len(
                fields)
            if self._cache_bytes + cached <= self._cache_limit:
                self._cache.update(zip(range(seq, seq + len(fields)), fields, strict=True))
                self._cache_bytes += cached
            self._since_checkpoint += sum(map(len, records))
            self.counters["accepted"] += len(fresh)
            self.counters["refused"] += len(refused)
            return last, high, self._links.refusals(source, journal_id)

    def _accept_one_by_one(self, source: str, calls: list[Any], high: int,
                           verdicts: dict[tuple[str, str], str | None],
                           refused: list[tuple[int, str]], now: float) -> list[Any]:
        """The calls of a batch to store: not seen, not refused (added to `refused`), not a
        repeat of a user id (under _lock)."""
        fresh = []
        claimed: set[str] = set()
        for call in calls:
            key, module, method, _, user_id, _, _ = call
            if key <= high:
                continue  # delivered again after a reconnect: accepted already
            high = key
            reason = verdicts[(module, method)]
            if reason is not None:
                refused.append((key, reason))
                continue
            if user_id is not None:
                known = self._ids.get((source, user_id))
                if (known is not None and known[1] > now) or user_id in claimed:
                    self.counters["duplicates"] += 1
                    continue
                claimed.add(user_id)
            fresh.append(call)
        return fresh

    def settle_outbound(self, queue_name: str, high: int, refused: dict[int, str],
                        sent: Iterable[StoredCall] = ()) -> int:
        """A peer acknowledged every call of `queue_name` up to key `high`: record them as
        transmitted, or as dead letters where the peer refused them; return the seq to wait
        for (0 when nothing changed).

        `sent` are the calls the link sent and has not settled yet (others with keys up to
        `high` were settled before). Calls not handed out (``take``) count too: a sender that
        crashed after the peer
        accepted its calls learns it from the peer's first acknowledgement after restarting.
        """
        with self._lock:
            taken = self._taken
            calls = [c for c in sent if c.key <= high and taken.get(c.key) is c]
            queue = self._queues.get((queue_name, True))
            if queue is not None and queue.pending:
                if not queue.sorted:
                    queue.pending = deque(sorted(queue.pending))
                    queue.sorted = True
                keys = []
                while queue.pending and queue.pending[0] <= high:
                    keys.append(queue.pending.popleft())
                if keys:
                    calls += self._hand_out(keys)
                    queue.taken += len(keys)
        if not refused:
            return self.finish(calls, []) if calls else 0
        done = [c for c in calls if c.key not in refused]
        seq = self.finish(done, []) if done else 0
        for call in calls:
            if call.key in refused:
                seq = self.bury(call, "refused", refused[call.key])
        return seq

    # ---- dead letters and status ---------------------------------------------------------

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        with self._lock:
            items = sorted(self._dead.items())
            records = self._payloads([key for key, _ in items])  # dead letters are never cached
        letters = []
        for key, (queue, _outbound, reason, detail, at, attempts, _size) in items:
            fields = records[key]
            letters.append(DeadLetter(self._id_of(fields, key), queue, fields[5], fields[6],
                                      reason, detail, at, attempts, fields[10]))
        return letters

    def revive(self, call_id: str, source: str | None = None) -> None:
        """Put a dead letter back in its queue with its attempt count reset.

        Raises:
            KeyError: `call_id` is not a dead letter.
            ValueError: the id was given by several source cages; say which with `source`.
        """
        copied = 0
        with self._lock:
            key = self._dead_key(call_id, source)
            name, outbound, *_, size = self._dead[key]
            if outbound:
                # The peer has seen every key up to its link's high-water mark, so a call sent
                # again must get a key above it: a copy under a new key, and the old one purged.
                # Its id stays what the caller was given: the copy carries it (a 12th item) and
                # the id window maps it to the new key.
                fields = list(self._payloads([key])[key])
                old_id = self._id_of(fields, key)
                new_key = fields[1] = self.journal.next_seq
                if fields[4] is None:
                    del fields[11:]
                    fields.append(old_id)
                copied = self.journal.append_many([self._packer.pack(fields),
                                                   self._packer.pack([K_PURGE, key])])
                del self._dead[key]
                self._moved.pop(key, None)
                self._user_calls.pop(key, None)
                ident = (self.cage_name, fields[4] if fields[4] is not None else old_id)
                entry = self._ids.get(ident)
                expiry = entry[1] if entry is not None else time.time() + self.retention
                self._ids[ident] = [new_key, expiry, False]
                self._user_calls[new_key] = ident
                key = new_key
            else:
                del self._dead[key]
                self._append([K_REVIVE, key])
            queue = self._queue(name, outbound)
            queue.pending.append(key)
            if outbound:
                queue.bytes += size
            queue.sorted = False
            self.counters["revived"] += 1
        if copied:
            self.journal.sync(copied)  # the copy can be sent once it is durable (take)

    def purge(self, call_id: str, source: str | None = None) -> None:
        """Delete a dead letter for good.

        Raises:
            KeyError: `call_id` is not a dead letter.
            ValueError: the id was given by several source cages; say which with `source`.
        """
        with self._lock:
            key = self._dead_key(call_id, source)
            del self._dead[key]
            self._moved.pop(key, None)
            self._user_calls.pop(key, None)  # its id stays taken, but it never completed
            self.counters["purged"] += 1
            self._append([K_PURGE, key])

    def status(self, call_id: str, source: str | None = None) -> CallStatus:
        """Where the call with `call_id` is (DESIGN.md §1 `call_status`): one made here, or one
        accepted from a peer, named by its id there."""
        with self._lock:
            key = self._key_of(call_id, source)
            if key is None:
                return self._peer_status(call_id)
            if key in self._dead:
                dead = self._dead[key]
                return CallStatus("dead", dead[2], dead[5])
            attempts = self._attempts.get(key, 0)
            taken = self._taken.get(key)
            if taken is not None:
                return CallStatus("stored" if taken.outbound else "accepted", None,
                                  taken.attempt)
            for queue in self._queues.values():
                if key in queue.pending:
                    return CallStatus("stored" if queue.outbound else "accepted", None, attempts)
            ident = self._ids.get((source or self.cage_name, call_id))
            outbound = self._recent.get(key, self._recent_old.get(key))
            if outbound is True or (ident is not None and ident[2] == TRANSMITTED):
                return CallStatus("transmitted", None, attempts)
            if outbound is not None or (ident is not None and ident[2]):
                return CallStatus("executed", None, attempts)
            return CallStatus("unknown")

    def _peer_status(self, call_id: str) -> CallStatus:
        """Where a call accepted from a peer is, by its automatic id there,
        "<source>:<journal>:<key>" (under _lock).

        Nothing is kept per call for this: it is looked for among the dead letters and the calls
        handed out, in the completions remembered (by that id), and in its source's queue, whose
        calls from one journal are in the order of their keys there (a binary search, reading a
        record per step). A call refused, or completed long ago, is unknown here.
        """
        source, _, rest = call_id.partition(":")
        journal, _, wire = rest.partition(":")
        if not (source and journal and wire.isdigit()) or source == self.cage_name:
            return CallStatus("unknown")
        if self._dead:
            records = self._payloads(sorted(self._dead))  # dead letters are never cached
            for key, fields in records.items():
                if len(fields) > 11 and fields[11] == call_id:
                    dead = self._dead[key]
                    return CallStatus("dead", dead[2], dead[5])
        for call in self._taken.values():
            if call.origin == call_id and not call.outbound:
                return CallStatus("accepted", None, call.attempt)
        if call_id in self._recent.values() or call_id in self._recent_old.values():
            return CallStatus("executed", None, 0)
        queue = self._queues.get((f"{source}_queue", False))
        if queue is not None and queue.pending:
            waiting = self._find_accepted(queue, f"{source}:{journal}:", int(wire))
            if waiting is not None:
                return CallStatus("accepted", None, self._attempts.get(waiting, 0))
        return CallStatus("unknown")

    def _find_accepted(self, queue: Queue, prefix: str, wire_key: int) -> int | None:
        """The key of the call in `queue` whose id on its source is `prefix` + `wire_key`."""
        if not queue.sorted:
            queue.pending = deque(sorted(queue.pending))
            queue.sorted = True
        pending = queue.pending
        low, high = 0, len(pending)
        while low < high:  # calls of one source journal arrive, and wait, in key order
            middle = (low + high) // 2
            origin = self._origin_of(pending[middle])
            if not origin.startswith(prefix) or not origin[len(prefix):].isdigit():
                break  # calls from another journal of that source: look at each
            found = int(origin[len(prefix):])
            if found == wire_key:
                return pending[middle]
            if found < wire_key:
                low = middle + 1
            else:
                high = middle
        else:
            return None
        target = prefix + str(wire_key)
        return next((key for key in pending if self._origin_of(key) == target), None)

    def _origin_of(self, key: int) -> str:
        """The id on its source of the pending call `key` ("" for a call made here)."""
        record = self._peek(key)
        return str(record[11]) if record is not None and len(record) > 11 else ""

    def _dead_key(self, call_id: str, source: str | None) -> int:
        """The key of the dead letter `call_id` (made by `source`, or by any cage)."""
        key = self._key_of(call_id, source)
        if key is None and source is None:
            found = {s: entry[0] for (s, u), entry in self._ids.items()
                     if u == call_id and entry[0] in self._dead}
            if len(found) > 1:
                raise ValueError(f"dead letters from {sorted(found)} all have the id {call_id!r}; "
                                 "say which with source=")
            key = next(iter(found.values()), None)
        if key is None or key not in self._dead:
            # A call accepted from another cage without an id= is known by its id on that cage,
            # which only its record holds.
            records = self._payloads(sorted(self._dead))  # dead letters are never cached
            key = next((k for k, fields in records.items()
                        if self._id_of(fields, k) == call_id
                        and source in (None, fields[10])), None)
        if key is None:
            raise KeyError(f"{call_id!r} is not a dead letter")
        return int(key)

    def _id_of(self, fields: Sequence[Any], key: int) -> str:
        """The id of the call in a CALL record (StoredCall's rule: its user id, its id on the
        cage that made it, or this cage's automatic id)."""
        return StoredCall(key, self._id_prefix, fields).call_id

    def _key_of(self, call_id: str, source: str | None = None) -> int | None:
        entry = self._ids.get((source or self.cage_name, call_id))
        if entry is not None:
            return int(entry[0])
        if call_id.startswith(self._id_prefix) and call_id[len(self._id_prefix):].isdigit():
            return int(call_id[len(self._id_prefix):])
        return None

    # ---- looking at it -------------------------------------------------------------------

    def queue_names(self, outbound: bool = False) -> list[str]:
        with self._lock:
            return [q.name for q in self._queues.values() if q.outbound == outbound]

    def pending(self, queue_name: str, outbound: bool = False) -> int:
        """Calls of the queue not yet completed (waiting, running or waiting for a retry)."""
        with self._lock:
            return self._count((queue_name, outbound))

    def outstanding(self) -> int:
        """Calls not yet completed or dead, in every queue."""
        with self._lock:
            return sum(len(q.pending) for q in self._queues.values()) + len(self._taken)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            queues = {(q.name, q.outbound): {"waiting": len(q.pending), "taken": 0}
                      for q in self._queues.values()}
            for call in self._taken.values():
                queues[(call.queue, call.outbound)]["taken"] += 1
            return {"counters": dict(self.counters), "queues": queues, "dead": len(self._dead),
                    "journal": self.journal.stats()}

    # ---- recovery, checkpoints and space (pmq._recovery) ------------------------------------

    def maintain(self, force: bool = False) -> bool:
        """Checkpoint, release what the journal no longer needs and relocate stragglers, if due.

        Returns True when a checkpoint was written.
        """
        due = (self._since_checkpoint >= self._checkpoint_bytes
               or time.monotonic() - self._last_checkpoint >= self._checkpoint_interval)
        if not (force or due):
            return False
        _recovery.relocate_stragglers(self)
        with self._lock:
            covered = self.journal.next_seq - 1
            state = _recovery.snapshot(self, covered)
            floor = _recovery.floor(self, covered)
            self._since_checkpoint = 0
            self._last_checkpoint = time.monotonic()
        if covered > 0:
            self.journal.sync(covered)  # nothing the checkpoint summarises may be lost after it
        write_checkpoint(self.directory, state)
        released = self.journal.release_before(floor) if floor > self.journal.floor else 0
        if released:
            log.debug("store %s: released %d journal segments below seq %d", self.directory,
                      released, floor)
        return True

    def close(self) -> None:
        """Write a final checkpoint and close the journal."""
        if self.journal.closed:
            return
        try:
            if not self.journal.failed:
                with self._lock:
                    calls = list(self._taken.values())
                self.give_back(calls)
                self.maintain(force=True)
        finally:
            self.journal.close()

    # ---- inspection (pmq CLI) ----
    # Read-only answers for `pmq status` and `pmq dead` (on a stopped cage's directory) and for
    # the built-in `pmq.status` (a running cage): they hand nothing out and let no cached payload
    # go, so asking never changes what the cage does next.

    def queue_report(self) -> list[dict[str, Any]]:
        """Every queue that holds calls or dead letters, with what ``pmq status`` shows of it.

        Reads at most one record per queue back from the journal (the head's, when it is not
        cached); holds the lock meanwhile, as ``take`` does.

        Returns:
            One dict per queue and direction, sorted by (outbound, name): ``queue``,
            ``outbound``, ``pending`` (waiting + handed out, as ``pending()``), ``in_flight``
            (handed out: running or waiting out a retry delay; outbound: sent, not yet
            acknowledged), ``dead`` (its dead letters) and ``oldest_created`` (when the oldest
            of the calls handed out and the head of the queue was made, by the clock of the
            cage that made it; None when nothing is pending).

        Raises:
            JournalCorruption: the head's record cannot be read back.
        """
        now = time.time()
        with self._lock:
            dead: dict[tuple[str, bool], int] = {}
            for entry in self._dead.values():
                dead[(entry[0], entry[1])] = dead.get((entry[0], entry[1]), 0) + 1
            oldest: dict[tuple[str, bool], float] = {}
            for call in self._taken.values():
                route = (call.queue, call.outbound)
                oldest[route] = min(oldest.get(route, call.created), call.created)
            report = []
            for route in sorted({*self._queues, *dead}, key=lambda r: (r[1], r[0])):
                queue = self._queues.get(route)
                waiting = len(queue.pending) if queue is not None else 0
                taken = queue.taken if queue is not None else 0
                first = oldest.get(route)
                if queue is not None and waiting:
                    head = queue.pending[0] if queue.sorted else min(queue.pending)
                    created = self._created_of(head, now)
                    first = created if first is None else min(first, created)
                report.append({"queue": route[0], "outbound": route[1],
                               "pending": waiting + taken, "in_flight": taken,
                               "dead": dead.get(route, 0), "oldest_created": first})
        return report

    def _created_of(self, key: int, now: float) -> float:
        """When the pending call `key` was made, from its record (under _lock); `now` for a
        record not written yet (a call made a moment ago)."""
        record = self._peek(key)
        return now if record is None else float(record[9])

    def _peek(self, key: int) -> tuple[Any, ...] | None:
        """The CALL record of the pending call `key`, leaving the cache as it is (under _lock);
        None for a record not written yet."""
        entry = self._cache.get(key)
        if isinstance(entry, bytes):
            return _unpack_record(entry)  # type: ignore[no-any-return]
        if entry is not None:
            return entry
        seq = self._moved.get(key, key)
        for _, payload in self.journal.replay(seq, seq + 1):
            return _unpack_record(payload)  # type: ignore[no-any-return]
        return None

    def dead_letter_call(self, call_id: str, source: str | None = None) -> dict[str, Any]:
        """What the record of the dead letter `call_id` holds beyond ``dead_letters()``.

        Returns:
            ``user_id`` (None for a call made without ``id=``), ``arguments`` (the packed bytes,
            for ``pmq._codec.unpack_arguments``), ``deadline`` (None for none), ``created`` and
            ``outbound`` (whether it was on its way to a peer).

        Raises:
            KeyError: `call_id` is not a dead letter.
            ValueError: the id was given by several source cages; say which with `source`.
        """
        with self._lock:
            key = self._dead_key(call_id, source)
            fields = self._payloads([key])[key]  # dead letters are never cached
            outbound = bool(self._dead[key][1])
        return {"user_id": fields[4], "arguments": fields[7], "deadline": fields[8],
                "created": fields[9], "outbound": outbound}

    def recorded_name(self) -> str | None:
        """The name of the cage this directory belongs to, as its dead letters record it: the
        source of a dead call it made itself (to itself or to a peer). None when no dead letter
        says (the directory records its cage's name nowhere else)."""
        with self._lock:
            keys = sorted(self._dead)
            records = self._payloads(keys)  # dead letters are never cached
            for key in keys:
                queue, outbound = self._dead[key][0], self._dead[key][1]
                source = records[key][10]
                # Calls accepted from cage S wait in "S_queue" (accept); the rest were made here.
                if outbound or queue != f"{source}_queue":
                    return str(source)
        return None


def _runs(seqs: list[int], gap: int) -> list[list[int]]:
    runs: list[list[int]] = []
    for seq in seqs:
        if runs and seq - runs[-1][-1] <= gap:
            runs[-1].append(seq)
        else:
            runs.append([seq])
    return runs

