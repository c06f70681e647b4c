"""A Hypothesis state machine drives one journal and checks it against a plain list model.

Rules: append, append_many, sync (all / one seq / asyncio), crash-and-reopen, clean reopen,
release_before, copy_forward and replay, on 64 KiB segments so rolls and deletions are frequent;
and a full disk (the fault hook makes preparing a segment fail with ENOSPC) during which an append
may be refused with StorageFull, taking no seq, until the disk is freed again.

How a crash is modelled, honestly: a killed process loses its memory but not what it had handed
to the OS. So "crash" copies the segment files *while the journal is open* (exactly the bytes a
SIGKILL at that instant would leave), opens the copy as the journal that lives on, and abandons
the original. The model then requires:
- every record the journal had called durable (``durable_seq``, or a returned sync) is recovered;
- what is recovered beyond that is the model's next records, whole appends / append_many batches
  only (a batch is one frame: all or nothing), never anything else;
- the floor set by a returned release_before survives.
The model adopts what was recovered: records that were never acknowledged may be gone.
A clean close, on the other hand, keeps every record appended, synced or not.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conftest import rounds
from pmq import _journal
from pmq._journal import Journal
from pmq.errors import StorageFull

SEGMENT_BYTES = 64 * 1024
MAX_PAYLOAD = 30000  # under max_payload_bytes of a 64 KiB segment (checked in initialize)

sizes = st.one_of(
    st.integers(0, 64),
    st.integers(500, 6000),
    st.integers(20000, MAX_PAYLOAD),
)
batch_sizes = st.lists(st.integers(0, 2500), min_size=1, max_size=10)


class JournalMachine(RuleBasedStateMachine):
    """One journal (replaced by its crash copy now and then) against a list of payloads."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="pmq-stateful-"))
        self.generation = 0
        self.journal: Any = None
        self.records: list[bytes] = []  # records[seq - 1] is the payload of seq
        self.unit_ends: list[int] = []  # last seq of each append / append_many not yet durable
        self.durable = 0  # every seq <= this must survive a crash
        self.floor = 1
        self.counter = 0
        self.disk_full = False  # preparing a segment fails with ENOSPC (the fault hook)

    # --- helpers ----------------------------------------------------------------------------

    def _open(self) -> None:
        self.journal = Journal(self.root / f"g{self.generation}", segment_bytes=SEGMENT_BYTES)

    def _payload(self, size: int) -> bytes:
        self.counter += 1
        head = b"<%d>" % self.counter
        return (head * (size // len(head) + 1))[:size]

    def _set_disk_full(self, full: bool) -> None:
        # The fault hook is process-global and the journal prepares its next segment in a
        # background thread (pmq-journal-spare, asked for once a segment is half full). A spare
        # being prepared while the fault changes would see the old disk or the new one depending
        # on timing: after fill, (append past half), free, fill, the roll then found a spare or
        # raised StorageFull at random, and Hypothesis needs every run of a case to behave alike.
        # So every background preparation finishes under the disk state it started in: join them
        # before the fault is set *and* before it is cleared.
        for thread in threading.enumerate():
            if thread.name.startswith("pmq-journal-spare"):
                thread.join()
        if full:
            _journal._set_fault("prepare", 1, errno.ENOSPC)
        else:
            _journal._clear_faults()

    def _observe_durable(self) -> None:
        """Take the journal's word for what is durable (a promise a crash will check)."""
        assert self.journal.durable_seq >= self.durable
        self.durable = self.journal.durable_seq
        self.unit_ends = [end for end in self.unit_ends if end > self.durable]

    def _replay_all(self) -> list[tuple[int, bytes]]:
        return list(self.journal.replay())

    # --- rules ------------------------------------------------------------------------------

    @initialize()
    def open_new_journal(self) -> None:
        """Start from an empty directory."""
        self._open()
        assert self.journal.max_payload_bytes >= MAX_PAYLOAD
        assert self.journal.next_seq == 1

    @rule(size=sizes)
    def append(self, size: int) -> None:
        """append takes the next seq."""
        payload = self._payload(size)
        try:
            seq = self.journal.append(payload)
        except StorageFull:
            assert self.disk_full, "StorageFull with room on the disk"
            assert self.journal.next_seq == len(self.records) + 1, "a refused append took a seq"
            event("append refused: StorageFull")
            return
        self.records.append(payload)
        assert seq == len(self.records)
        self.unit_ends.append(seq)
        self._observe_durable()

    @rule(batch=batch_sizes)
    def append_many(self, batch: list[int]) -> None:
        """append_many takes consecutive seqs and returns the last."""
        payloads = [self._payload(size) for size in batch]
        try:
            last = self.journal.append_many(payloads)
        except StorageFull:
            assert self.disk_full, "StorageFull with room on the disk"
            assert self.journal.next_seq == len(self.records) + 1, "a refused batch took a seq"
            return
        self.records.extend(payloads)
        assert last == len(self.records)
        self.unit_ends.append(last)
        self._observe_durable()

    @rule()
    def sync_everything(self) -> None:
        """sync() makes every appended record durable."""
        self.journal.sync()
        assert self.journal.durable_seq == len(self.records)
        self._observe_durable()

    @precondition(lambda self: len(self.records) > 0)
    @rule(data=st.data())
    def sync_one_seq(self, data: st.DataObject) -> None:
        """sync(seq) makes at least seq durable."""
        seq = data.draw(st.integers(1, len(self.records)), label="seq")
        self.journal.sync(seq)
        assert self.journal.durable_seq >= seq
        self._observe_durable()

    @precondition(lambda self: len(self.records) > 0)
    @rule()
    def sync_from_asyncio(self) -> None:
        """await sync_async(seq) returns with seq durable."""
        seq = len(self.records)

        async def wait() -> None:
            await self.journal.sync_async(seq)
            assert self.journal.durable_seq >= seq

        asyncio.run(wait())
        self._observe_durable()

    @rule()
    def crash_and_reopen(self) -> None:
        """A process crash keeps what was written; everything acknowledged durable comes back."""
        source = self.root / f"g{self.generation}"
        self.generation += 1
        target = self.root / f"g{self.generation}"
        target.mkdir()
        for segment in source.glob("*.seg"):  # spares (*.tmp) are never part of the log
            shutil.copyfile(segment, target / segment.name)
        self._set_disk_full(False)  # the abandoned original may need room for its CLOSE frame
        self.journal.close()  # the original is abandoned; its clean close changes nothing here
        self._open()
        self._set_disk_full(self.disk_full)

        recovered = self._replay_all()
        kept = self.floor - 1 + len(recovered)
        assert kept >= self.durable, f"lost durable records: kept {kept}, durable {self.durable}"
        assert kept == self.durable or kept in self.unit_ends, f"torn unit: kept {kept}"
        expected = [(s, self.records[s - 1]) for s in range(self.floor, kept + 1)]
        assert recovered == expected
        assert self.journal.floor == self.floor
        assert self.journal.next_seq == kept + 1
        event(
            "crash lost unacknowledged records"
            if kept < len(self.records)
            else "crash lost nothing"
        )
        del self.records[kept:]
        self.unit_ends = []
        self.durable = kept
        self._observe_durable()

    @precondition(lambda self: not self.disk_full)
    @rule()
    def fill_the_disk(self) -> None:
        """From now on no new segment can be prepared (ENOSPC)."""
        self.disk_full = True
        self._set_disk_full(True)

    @precondition(lambda self: self.disk_full)
    @rule()
    def free_the_disk(self) -> None:
        """Space is back: appends that need a new segment work again."""
        self.disk_full = False
        self._set_disk_full(False)

    @precondition(lambda self: not self.disk_full)
    @rule()
    def close_and_reopen(self) -> None:
        """A clean close keeps every appended record, synced or not."""
        self.journal.close()
        assert self.journal.closed
        self._open()
        assert self.journal.durable_seq == len(self.records)
        self._observe_durable()

    @precondition(lambda self: not self.disk_full)
    @rule(data=st.data())
    def release_before(self, data: st.DataObject) -> None:
        """release_before raises the floor and deletes only whole segments below it."""
        seq = data.draw(st.integers(self.floor, len(self.records) + 1), label="release_before")
        before = self.journal.segments()
        deleted = self.journal.release_before(seq)
        self.floor = max(self.floor, seq)
        assert self.journal.floor == self.floor
        after = self.journal.segments()
        # The LOWWATER frame may itself need a new segment, so count by path, not by length.
        gone = [s for s in before if s.path not in {a.path for a in after}]
        assert deleted == len(gone)
        assert gone == before[: len(gone)], "a segment other than the oldest ones was deleted"
        assert after[-1].active
        for older, newer in itertools.pairwise(after):
            assert newer.base_seq > self.floor, "a segment wholly below the floor was kept"
            assert older.base_seq < newer.base_seq
        event("release_before deleted segments" if deleted else "release_before deleted nothing")
        for segment in gone:
            assert not Path(segment.path).exists()
        self._observe_durable()

    @precondition(lambda self: len(self.records) >= 1 and not self.disk_full)
    @rule(data=st.data())
    def copy_forward(self, data: st.DataObject) -> None:
        """copy_forward appends copies durably and maps old seqs to new ones, in order."""
        live = range(self.floor, len(self.records) + 1)
        if not live:
            return
        chosen = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=5, unique=True))
        first_new = len(self.records) + 1
        mapping = self.journal.copy_forward(chosen)
        assert mapping == {old: first_new + i for i, old in enumerate(sorted(chosen))}
        for old in sorted(chosen):
            self.records.append(self.records[old - 1])
        assert self.journal.durable_seq == len(self.records)
        self._observe_durable()

    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """replay(start, stop) yields the range's written records that are not below the floor."""
        end = len(self.records) + 2
        start = data.draw(st.integers(1, end), label="start")
        stop = data.draw(st.one_of(st.none(), st.integers(start, end + 1)), label="stop")
        got = list(self.journal.replay(start, stop))
        upto = (
            self.journal.written_seq + 1
            if stop is None
            else min(stop, self.journal.written_seq + 1)
        )
        expected = [(s, self.records[s - 1]) for s in range(max(start, self.floor), upto)]
        assert got == expected

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def marks_agree_with_the_model(self) -> None:
        """next_seq, floor and the durability marks match the model."""
        if self.journal is None:
            return
        assert self.journal.next_seq == len(self.records) + 1
        assert self.journal.floor == self.floor
        event("several segments" if len(self.journal.segments()) > 1 else "one segment")
        assert self.durable <= self.journal.durable_seq <= self.journal.written_seq
        assert self.journal.written_seq <= len(self.records)

    def teardown(self) -> None:
        """Close the journal and delete every generation's directory."""
        try:
            self._set_disk_full(False)  # no fault outlives this example (close joins the spare)
            if self.journal is not None:
                self.journal.close()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class TestJournalAgainstListModel(JournalMachine.TestCase):
    """The journal behaves like a list through crashes, reopens and reclaims."""

    settings = settings(max_examples=rounds(150, 1000), stateful_step_count=60)


# make torture: 2,000 longer runs, split so that no single test runs for many minutes.
for _part in range(5):
    globals()[f"TestJournalAgainstListModelAtLength{_part}"] = pytest.mark.torture(
        type(
            f"TestJournalAgainstListModelAtLength{_part}",
            (JournalMachine.TestCase,),
            {
                "__doc__": "The same machine with more and longer runs (make torture).",
                "__module__": __name__,
                "settings": settings(max_examples=400, stateful_step_count=100),
            },
        )
    )
