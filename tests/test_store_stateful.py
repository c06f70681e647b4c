"""A Hypothesis state machine drives pmq.store.Store and checks it against a plain model.

Rules: enqueue (single calls and batches; loopback, inbound from another cage and outbound
queues; with and without user ids, duplicates included; with a back-pressure limit), take,
begin_attempts, finish (done / failed), give_back, bury, revive, purge, maintain(force=True),
a clean close-and-reopen and a crash-and-reopen. Segments are 64 KiB and the payload cache is
off, so calls are read back from the journal, checkpoints and releases cross segments, and
long-pending calls get copied forward.

The model follows the dispatcher's contract with the store (store.py, dispatch.py):
- an attempt is begun only for a call that is handed out (taken) and has no open attempt;
  it is finished (done or failed) or buried; a failed call stays handed out (the dispatcher
  keeps it for its retry) until it is begun again, buried or given back;
- only calls with no open attempt are given back (the dispatcher gives back its retries).

How a crash is modelled: everything appended is synced, then the data directory is copied
while the store is open (the bytes a SIGKILL at that instant would leave), the copy is opened
and the original abandoned. After a crash, as after a clean close, every call that was handed
out is pending again, and an attempt that was open counts as a crash.

Invariants, after every step: per queue, the calls pending (waiting + handed out) match the
model, in number (``pending``, ``stats``, ``outstanding``) and one by one (``status``); the dead
letters match; attempts per call match (``status``), crashes per call match (checked when a
call is taken); ``status`` agrees for completed, dead, purged and never-made calls.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conftest import rounds
from pmq._calls import NewCall, StoredCall
from pmq.errors import QueueFull
from pmq.store import Store

SEGMENT_BYTES = 64 * 1024
CAGE = "solo"
#: (queue, outbound, source): loopback calls, calls accepted from cage "billing", calls to "ledger".
QUEUES = [
    ("loopback_queue", False, CAGE),
    ("billing_queue", False, "billing"),
    ("ledger_queue", True, CAGE),
]
OUTBOUND_LIMIT = 6  # max_pending of ledger_queue when an enqueue passes a limit
MAX_CALLS = 200  # calls made per run (keeps each invariant check cheap)

user_ids = st.one_of(st.none(), st.none(), st.sampled_from([f"id-{n}" for n in range(10)]),
                     st.just("transfer/1:step"))


def _calls(sizes: st.SearchStrategy[int]) -> st.SearchStrategy[tuple[int, str | None, int]]:
    return st.tuples(st.integers(0, len(QUEUES) - 1), user_ids, sizes)


# A batch is one journal frame (at most ~30 KiB on 64 KiB segments): big calls come alone.
batches = st.one_of(
    st.lists(_calls(st.one_of(st.integers(0, 200), st.integers(2000, 5000))), min_size=1,
             max_size=5),
    st.lists(_calls(st.integers(8000, 20000)), min_size=1, max_size=1),
)


@dataclass
class ModelCall:
    """What the model knows about one stored call."""

    order: float  # creation order: the store hands calls out oldest first
    call_id: str
    queue: str
    outbound: bool
    source: str
    user_id: str | None
    method: str
    arguments: bytes
    state: str = "waiting"  # waiting, taken, done, dead, purged
    attempts: int = 0
    crashes: int = 0
    open: bool = False  # an attempt was begun and has not ended
    reason: str = ""
    detail: str = ""
    dead_attempts: int = 0
    forgotten_ok: bool = False  # done, then reopened: "unknown" is a fair status for it


class StoreMachine(RuleBasedStateMachine):
    """One Store (reopened, or replaced by its crash copy, now and then) against ModelCalls."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="pmq-store-stateful-"))
        self.generation = 0
        self.store: Any = None
        self.calls: list[ModelCall] = []
        self.by_id: dict[tuple[str, str], ModelCall] = {}  # (source, call id) -> call
        self.handed: dict[float, StoredCall] = {}  # order -> the StoredCall take() returned
        self.revived = 0  # outbound calls revived so far (they get new orders)
        self.claimed: set[tuple[str, str]] = set()  # (source, user id) ever stored
        self.counter = 0

    # --- helpers ----------------------------------------------------------------------------

    def _directory(self) -> Path:
        return self.root / f"g{self.generation}"

    def _open(self) -> None:
        self.store = Store(str(self._directory()), CAGE, durability="always",
                           segment_bytes=SEGMENT_BYTES, retention=1e9, cache_bytes=0)

    def _with(self, state: str) -> list[ModelCall]:
        return [c for c in self.calls if c.state == state]

    def _taken_closed(self) -> list[ModelCall]:
        return [c for c in self.calls if c.state == "taken" and not c.open]

    def _taken_open(self) -> list[ModelCall]:
        return [c for c in self.calls if c.state == "taken" and c.open]

    def _after_restart(self) -> None:
        """What a restart does to the model: handed-out calls wait again, open attempts crashed."""
        for call in self.calls:
            if call.state == "taken":
                call.state = "waiting"
            if call.open:
                call.open = False
                call.crashes += 1
            if call.state == "done" and call.user_id is None:
                call.forgotten_ok = True
        self.handed = {}

    def _new_arguments(self, size: int) -> bytes:
        self.counter += 1
        head = b"<%d>" % self.counter
        return (head * (size // len(head) + 1))[:size]

    def _status(self, call: ModelCall) -> Any:
        return self.store.status(call.call_id, call.source)

    # --- rules ------------------------------------------------------------------------------

    @initialize()
    def open_new_store(self) -> None:
        """Start from an empty directory."""
        self._open()
        assert self.store.outstanding() == 0 and self.store.dead_letters() == []

    @precondition(lambda self: len(self.calls) < MAX_CALLS)
    @rule(batch=batches, limited=st.integers(0, 3).map(lambda n: n == 0))
    def enqueue(self, batch: list[tuple[int, str | None, int]], limited: bool) -> None:
        """enqueue stores new calls in one frame; a known user id returns its id, stores nothing."""
        new: list[NewCall] = []
        for queue_index, user_id, size in batch:
            queue, outbound, source = QUEUES[queue_index]
            new.append(NewCall(queue, outbound, "mod", f"m{len(new)}", self._new_arguments(size),
                               user_id, None, source))

        def limit(queue: str) -> tuple[int, int]:
            return (OUTBOUND_LIMIT, 1 << 30) if queue == "ledger_queue" else (1 << 30, 1 << 30)

        fresh: list[NewCall] = []
        seen = set(self.claimed)
        for call in new:
            if call.user_id is not None:
                if (call.source, call.user_id) in seen:
                    continue
                seen.add((call.source, call.user_id))
            fresh.append(call)
        outbound_after = len([c for c in self.calls
                              if c.outbound and c.state in ("waiting", "taken")])
        outbound_after += len([c for c in fresh if c.outbound])
        next_seq = self.store.journal.next_seq
        if limited and outbound_after > OUTBOUND_LIMIT and any(c.outbound for c in fresh):
            with pytest.raises(QueueFull):
                self.store.enqueue(new, limit)
            assert self.store.journal.next_seq == next_seq, "a refused enqueue stored something"
            event("enqueue refused: QueueFull")
            return
        ids, seq = self.store.enqueue(new, limit if limited else None)
        assert len(ids) == len(new)
        if not fresh:
            assert seq == 0 and self.store.journal.next_seq == next_seq
            event("enqueue of duplicates only")
        else:
            self.store.journal.sync(seq)  # as the cage does before telling anyone
        for call, call_id in zip(new, ids, strict=True):
            if call.user_id is not None:
                assert call_id == call.user_id
            if call not in fresh:
                continue
            assert (call.source, call_id) not in self.by_id, f"id {call_id} given twice"
            model = ModelCall(len(self.calls), call_id, call.queue, call.outbound, call.source,
                              call.user_id, call.method, call.arguments)
            self.calls.append(model)
            self.by_id[(call.source, call_id)] = model
            if call.user_id is not None:
                self.claimed.add((call.source, call.user_id))
        if len(fresh) < len(new):
            event("enqueue with a duplicate user id")

    @precondition(lambda self: len(self.calls) < MAX_CALLS)
    @rule(queue_index=st.integers(0, len(QUEUES) - 1), count=st.integers(1, 20))
    def enqueue_backlog(self, queue_index: int, count: int) -> None:
        """A burst of single ~3 KiB calls (one frame each) fills segments."""
        queue, outbound, source = QUEUES[queue_index]
        for _ in range(count):
            arguments = self._new_arguments(3000)
            [call_id], seq = self.store.enqueue(
                [NewCall(queue, outbound, "mod", "burst", arguments, None, None, source)])
            self.store.journal.sync(seq)
            model = ModelCall(len(self.calls), call_id, queue, outbound, source, None, "burst",
                              arguments)
            self.calls.append(model)
            self.by_id[(source, call_id)] = model

    @rule(queue_index=st.integers(0, len(QUEUES) - 1))
    def run_queue(self, queue_index: int) -> None:
        """What a dispatcher round does: take everything waiting, begin, finish it all done."""
        queue, outbound, _ = QUEUES[queue_index]
        taken = self.store.take(queue, 10_000, outbound)
        waiting = sorted((c for c in self.calls
                          if c.state == "waiting" and (c.queue, c.outbound) == (queue, outbound)),
                         key=lambda c: c.order)
        assert [s.call_id for s in taken] == [c.call_id for c in waiting]
        self.store.journal.sync(self.store.begin_attempts(taken))
        self.store.finish(taken, [])
        for call in waiting:
            call.state = "done"

    @rule(queue_index=st.integers(0, len(QUEUES) - 1), limit=st.integers(1, 6))
    def take(self, queue_index: int, limit: int) -> None:
        """take hands out the queue's oldest waiting calls, with their payloads and counts."""
        queue, outbound, _ = QUEUES[queue_index]
        taken = self.store.take(queue, limit, outbound)
        waiting = sorted((c for c in self.calls
                          if c.state == "waiting" and (c.queue, c.outbound) == (queue, outbound)),
                         key=lambda c: c.order)
        expected = waiting[:limit]
        assert [s.call_id for s in taken] == [c.call_id for c in expected]
        for stored, call in zip(taken, expected, strict=True):
            assert (stored.queue, stored.outbound, stored.source) == (queue, outbound, call.source)
            assert (stored.user_id, stored.module, stored.method) == (call.user_id, "mod",
                                                                      call.method)
            assert stored.arguments == call.arguments
            assert stored.attempt == call.attempts, f"attempts of {call.call_id}"
            assert stored.crashes == call.crashes, f"crashes of {call.call_id}"
            assert stored.deadline is None
            call.state = "taken"
            self.handed[call.order] = stored
            if call.crashes:
                event("took a call that had crashed")

    @precondition(lambda self: any(c.state == "taken" and not c.open for c in self.calls))
    @rule(data=st.data())
    def begin_attempts(self, data: st.DataObject) -> None:
        """begin_attempts records attempts (durably, once synced) before handlers would run."""
        candidates = self._taken_closed()
        chosen = data.draw(st.lists(st.sampled_from(candidates), min_size=1, unique_by=id),
                           label="begin")
        seq = self.store.begin_attempts([self.handed[c.order] for c in chosen])
        self.store.journal.sync(seq)
        for call in chosen:
            call.attempts += 1
            call.open = True
            assert self.handed[call.order].attempt == call.attempts

    @precondition(lambda self: any(c.state == "taken" and c.open for c in self.calls))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        """finish records done calls (forgotten) and failed ones (attempt closed, still held)."""
        candidates = self._taken_open()
        chosen = data.draw(st.lists(st.sampled_from(candidates), min_size=1, unique_by=id),
                           label="finish")
        outcomes = data.draw(st.lists(st.booleans(), min_size=len(chosen), max_size=len(chosen)),
                             label="done?")
        done = [c for c, ok in zip(chosen, outcomes, strict=True) if ok]
        failed = [c for c, ok in zip(chosen, outcomes, strict=True) if not ok]
        self.store.finish([self.handed[c.order] for c in done],
                          [self.handed[c.order] for c in failed])
        for call in done:
            call.state = "done"
            call.open = False
            del self.handed[call.order]
        for call in failed:
            call.open = False

    @precondition(lambda self: any(c.state == "taken" and not c.open for c in self.calls))
    @rule(data=st.data())
    def give_back(self, data: st.DataObject) -> None:
        """give_back returns handed-out calls (with no open attempt) to their queues."""
        candidates = self._taken_closed()
        chosen = data.draw(st.lists(st.sampled_from(candidates), min_size=1, unique_by=id),
                           label="give back")
        self.store.give_back([self.handed.pop(c.order) for c in chosen])
        for call in chosen:
            call.state = "waiting"

    @precondition(lambda self: any(c.state == "taken" for c in self.calls))
    @rule(data=st.data(), reason=st.sampled_from(["rejected", "expired", "not exposed"]))
    def bury(self, data: st.DataObject, reason: str) -> None:
        """bury moves a handed-out call to the dead letters, closing any open attempt."""
        call = data.draw(st.sampled_from(self._with("taken")), label="bury")
        detail = f"detail of {call.call_id}"
        self.store.bury(self.handed.pop(call.order), reason, detail)
        call.state = "dead"
        call.open = False
        call.reason, call.detail, call.dead_attempts = reason, detail, call.attempts
        call.attempts = call.crashes = 0

    @precondition(lambda self: bool(self._addressable_dead()))
    @rule(data=st.data())
    def revive(self, data: st.DataObject) -> None:
        """revive puts a dead letter back in its queue with its counts reset."""
        call = data.draw(st.sampled_from(self._addressable_dead()), label="revive")
        self.store.revive(call.call_id)
        call.state = "waiting"
        if call.outbound:
            # The peer has seen every key up to its high-water mark, so the store sends the call
            # again as a copy under a new key: after every call made so far, before the next.
            self.revived += 1
            call.order = len(self.calls) - 0.5 + self.revived * 1e-6

    def _addressable_dead(self) -> list[ModelCall]:
        """Dead letters that revive/purge can name: a user id from another cage cannot be
        (they take no source; see test_dead_letter_with_another_cages_user_id_can_be_replayed)."""
        return [c for c in self._with("dead") if c.user_id is None or c.source == CAGE]

    @precondition(lambda self: bool(self._addressable_dead()))
    @rule(data=st.data())
    def purge(self, data: st.DataObject) -> None:
        """purge deletes a dead letter; reviving or purging it again raises KeyError."""
        call = data.draw(st.sampled_from(self._addressable_dead()), label="purge")
        self.store.purge(call.call_id)
        call.state = "purged"
        if any(c.call_id == call.call_id for c in self._with("dead")):
            # Another cage's call with the same user id is dead too: an id without a source
            # names it now (the store looks for this cage's own ids first, then any cage's).
            event("purge left a dead letter of another cage with the same id")
            return
        with pytest.raises(KeyError):
            self.store.purge(call.call_id)
        with pytest.raises(KeyError):
            self.store.revive(call.call_id)

    @rule()
    def maintain(self) -> None:
        """maintain(force=True) checkpoints, copies stragglers forward and releases segments."""
        segments = len(self.store.journal.segments())
        assert self.store.maintain(force=True)
        after = len(self.store.journal.segments())
        event("maintain released segments" if after < segments else "maintain released none")
        if self.store.counters["relocated"]:
            event("calls were copied forward")

    @rule()
    def close_and_reopen(self) -> None:
        """A clean close and a new Store on the directory: handed-out calls wait again."""
        self.store.close()
        self._open()
        self._after_restart()

    @rule()
    def crash_and_reopen(self) -> None:
        """A crash after everything was synced: the copy made while open recovers the same state."""
        self.store.journal.sync()
        source = self._directory()
        self.generation += 1
        target = self._directory()
        (target / "journal").mkdir(parents=True)
        for segment in (source / "journal").glob("*.seg"):  # spares (*.tmp) are not the log
            shutil.copyfile(segment, target / "journal" / segment.name)
        if (source / "checkpoint").exists():
            shutil.copyfile(source / "checkpoint", target / "checkpoint")
        self.store.close()  # the original is abandoned; its clean close changes nothing here
        self._open()
        self._after_restart()

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def queues_agree_with_the_model(self) -> None:
        """Per queue, pending counts (waiting and handed out) match; so does outstanding()."""
        if self.store is None:
            return
        stats = self.store.stats()["queues"]
        for queue, outbound, _ in QUEUES:
            waiting = len([c for c in self.calls if c.state == "waiting"
                           and (c.queue, c.outbound) == (queue, outbound)])
            taken = len([c for c in self.calls if c.state == "taken"
                         and (c.queue, c.outbound) == (queue, outbound)])
            assert self.store.pending(queue, outbound) == waiting + taken, queue
            got = stats.get((queue, outbound), {"waiting": 0, "taken": 0})
            assert got == {"waiting": waiting, "taken": taken}, queue
        live = [c for c in self.calls if c.state in ("waiting", "taken")]
        assert self.store.outstanding() == len(live)

    @invariant()
    def dead_letters_agree_with_the_model(self) -> None:
        """dead_letters() lists exactly the model's dead calls, oldest first, with their reasons."""
        if self.store is None:
            return
        got = [(d.call_id, d.queue, d.module, d.method, d.reason, d.detail, d.attempts)
               for d in self.store.dead_letters()]
        # Oldest first means in key order, where a revived call to a peer (a copy under a new
        # key) comes after every call made before its revival: the model's `order`.
        expected = [(c.call_id, c.queue, "mod", c.method, c.reason, c.detail, c.dead_attempts)
                    for c in sorted(self._with("dead"), key=lambda c: c.order)]
        assert got == expected
        assert self.store.stats()["dead"] == len(expected)

    @invariant()
    def status_agrees_with_the_model(self) -> None:
        """call_status of every call: stored/accepted with attempts, executed or transmitted, dead,
        unknown."""
        if self.store is None:
            return
        for call in self.calls:
            status = self._status(call)
            if call.state in ("waiting", "taken"):
                assert status.state == ("stored" if call.outbound else "accepted"), call
                assert status.attempts == call.attempts, call
            elif call.state == "dead":
                assert (status.state, status.reason, status.attempts) == (
                    "dead", call.reason, call.dead_attempts), call
            elif call.state == "done":
                done = "transmitted" if call.outbound else "executed"
                allowed = {done, "unknown"} if call.forgotten_ok else {done}
                assert status.state in allowed, call
            else:  # purged: it never executed
                assert status.state == "unknown", call
        assert self.store.status("never-made").state == "unknown"
        assert self.store.status(f"{CAGE}:00000000:1").state == "unknown"

    def teardown(self) -> None:
        """Close the store and delete every generation's directory."""
        try:
            if self.store is not None:
                self.store.close()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class TestStoreAgainstModel(StoreMachine.TestCase):
    """The store keeps queues, attempts and dead letters like the model, across restarts."""

    settings = settings(max_examples=rounds(60, 1000), stateful_step_count=80)


@pytest.mark.torture
class TestStoreAgainstModelAtLength(StoreMachine.TestCase):
    """The same machine with longer runs (make torture)."""

    settings = settings(max_examples=500, stateful_step_count=120)


def test_dead_letter_with_another_cages_user_id_can_be_replayed(tmp_path: Path) -> None:
    """A dead letter accepted from another cage with id= is listed by an id replay/purge accept."""
    store = Store(str(tmp_path / "store"), CAGE, segment_bytes=SEGMENT_BYTES)
    try:
        [call_id], seq = store.enqueue(
            [NewCall("billing_queue", False, "mod", "f", b"", "transfer/9", None, "billing")])
        store.journal.sync(seq)
        [call] = store.take("billing_queue", 1)
        store.bury(call, "rejected", "no")
        [letter] = store.dead_letters()
        assert letter.call_id == call_id == "transfer/9"
        store.revive(letter.call_id)  # the id dead_letters() gave must name the letter
        assert store.pending("billing_queue") == 1
    finally:
        store.close()
