"""I/O failures: a failed fsync or write fails the journal for good; no room for a segment does not.

Most faults are injected with ``pmq._journal._set_fault(op, countdown, errno, short_bytes)``
(docs/journal.md "Test hook"), because the OS cannot be made to fail an fsync on demand. Two tests
use a real kernel error instead: a child process with RLIMIT_FSIZE (and SIGXFSZ ignored) gets
EFBIG from write() past the limit, inside a segment (the journal fails) and while preparing a
zero-filled segment (StorageFull, and appends work again once the limit is lifted).

What must hold (docs/journal.md "Failures"):
- fsync or write fails: that sync raises JournalFailed, so does every later append and sync,
  ``failed`` is True, no fsync is tried again, and a reopen finds every acknowledged record
  (a partly written frame is a torn tail, cut off).
- a segment cannot be prepared: the append that needed it raises StorageFull and takes no seq,
  earlier records are intact, and appends work again (with contiguous seqs) once there is room.
"""

from __future__ import annotations

import asyncio
import errno
import json
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pmq import _journal
from pmq._journal import Journal
from pmq.errors import JournalFailed, StorageFull

KIB = 1024
MIB = 1024 * KIB


@pytest.fixture(autouse=True)
def no_faults(make_journal: Any) -> Iterator[None]:
    """Start and end every test with no injected fault, whatever the test did.

    It depends on make_journal so that the fault is cleared before those journals are closed.
    """
    _journal._clear_faults()
    yield
    _journal._clear_faults()


def payload_for(i: int, size: int = 100) -> bytes:
    """A deterministic payload of ``size`` bytes that names ``i``."""
    head = b"fault-%d;" % i
    return (head * (size // len(head) + 1))[:size]


def acknowledge(journal: Any, first: int, count: int, size: int = 100) -> list[tuple[int, bytes]]:
    """Append ``count`` records, sync them, and return them as acknowledged (seq, payload)."""
    records = []
    for i in range(first, first + count):
        p = payload_for(i, size)
        records.append((journal.append(p), p))
    journal.sync()
    return records


def reopen_and_replay(directory: Path, **kwargs: Any) -> tuple[list[tuple[int, bytes]], int]:
    """Open ``directory`` again (running recovery) and return its records and next_seq."""
    with Journal(directory, **kwargs) as journal:
        return list(journal.replay()), journal.next_seq


def assert_refuses_work(journal: Any) -> None:
    """Every appending or syncing call of a failed journal raises JournalFailed."""
    with pytest.raises(JournalFailed):
        journal.append(b"more")
    with pytest.raises(JournalFailed):
        journal.append_many([b"more", b"and more"])
    with pytest.raises(JournalFailed):
        journal.sync()
    with pytest.raises(JournalFailed):
        journal.release_before(1)
    with pytest.raises(JournalFailed):
        journal.copy_forward([1])

    async def wait() -> None:
        await journal.sync_async()

    with pytest.raises(JournalFailed):
        asyncio.run(wait())


# --- fsync fails -------------------------------------------------------------------------------


def test_failed_fsync_fails_that_sync_and_every_later_call(
    make_journal: Any, journal_dir: Path
) -> None:
    """fsync EIO: JournalFailed now and for good; earlier acknowledged records survive a reopen."""
    journal = make_journal(segment_bytes=1 * MIB)
    acked = acknowledge(journal, 1, 20)
    journal.append(b"not acknowledged")
    _journal._set_fault("sync", 1, errno.EIO)
    with pytest.raises(JournalFailed, match="fsync"):
        journal.sync()
    assert journal.failed
    assert journal.durable_seq == 20
    assert_refuses_work(journal)
    journal.close()
    _journal._clear_faults()

    records, next_seq = reopen_and_replay(journal_dir, segment_bytes=1 * MIB)
    assert records[:20] == acked
    # The unacknowledged record was written before the fsync failed: it may or may not be there.
    assert records[20:] in ([], [(21, b"not acknowledged")])
    assert next_seq == len(records) + 1


def test_failed_fsync_is_never_retried_even_when_it_would_now_succeed(make_journal: Any) -> None:
    """After an fsync failed, clearing the fault does not revive the journal: no second fsync."""
    journal = make_journal(segment_bytes=1 * MIB)
    acknowledge(journal, 1, 5)
    _journal._set_fault("sync", 1, errno.EIO)
    seq = journal.append(b"doomed")
    with pytest.raises(JournalFailed):
        journal.sync(seq)
    failed_stats = journal.stats()
    _journal._clear_faults()  # an fsync tried now would succeed and show in the stats
    for _ in range(3):
        with pytest.raises(JournalFailed):
            journal.sync()
        with pytest.raises(JournalFailed):
            journal.sync(seq)
    assert journal.stats()["fsyncs"] == failed_stats["fsyncs"]
    assert journal.stats()["flushes"] == failed_stats["flushes"]
    assert journal.durable_seq == 5
    assert journal.failed


def test_failed_fsync_wakes_every_waiter_of_its_batch_with_journal_failed(
    make_journal: Any, journal_dir: Path
) -> None:
    """Many threads syncing when the fsync fails all get JournalFailed; none hangs or succeeds."""
    journal = make_journal(segment_bytes=1 * MIB)
    acked = acknowledge(journal, 1, 10)
    threads_n = 12
    start = threading.Barrier(threads_n + 1)
    outcomes: list[str] = []

    def produce(t: int) -> None:
        start.wait()
        try:
            for i in range(1000):
                journal.sync(journal.append(b"%d:%d" % (t, i)))
            outcomes.append("never failed")
        except JournalFailed:
            outcomes.append("failed")
        except BaseException as error:  # anything else is a bug; reported below
            outcomes.append(repr(error))

    workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads_n)]
    for w in workers:
        w.start()
    _journal._set_fault("sync", 3, errno.EIO)
    start.wait()
    for w in workers:
        w.join(timeout=300)
    assert not any(w.is_alive() for w in workers), "a waiter hung after the fsync failed"
    assert outcomes == ["failed"] * threads_n
    assert journal.failed
    durable = journal.durable_seq
    journal.close()
    _journal._clear_faults()
    records, _ = reopen_and_replay(journal_dir, segment_bytes=1 * MIB)
    assert records[:10] == acked
    assert len(records) >= durable


def test_failed_fsync_fails_the_futures_of_sync_async(make_journal: Any) -> None:
    """Coroutines awaiting sync_async when the fsync fails get JournalFailed from their futures."""
    journal = make_journal(segment_bytes=1 * MIB)
    acknowledge(journal, 1, 3)

    async def produce(i: int) -> str:
        try:
            await journal.sync_async(journal.append(payload_for(i)))
        except JournalFailed:
            return "failed"
        return "durable"

    async def main() -> list[str]:
        _journal._set_fault("sync", 1, errno.EIO)
        return list(await asyncio.gather(*(produce(i) for i in range(50))))

    assert asyncio.run(main()) == ["failed"] * 50
    assert journal.failed


def test_failed_fsync_of_the_old_segment_during_a_roll_fails_the_journal(
    make_journal: Any, journal_dir: Path
) -> None:
    """The fsync a roll makes of the full segment is checked too: JournalFailed, acks survive."""
    journal = make_journal(segment_bytes=64 * KIB)
    acked = acknowledge(journal, 1, 10, size=1000)
    _journal._set_fault("sync", 1, errno.EIO)
    with pytest.raises(JournalFailed):
        for i in range(11, 200):  # fills the segment without syncing: the roll's fsync is next
            journal.append(payload_for(i, 1000))
        journal.sync()
    assert journal.failed
    assert_refuses_work(journal)
    journal.close()
    _journal._clear_faults()
    records, next_seq = reopen_and_replay(journal_dir, segment_bytes=64 * KIB)
    assert records[:10] == acked
    assert [s for s, _ in records] == list(range(1, next_seq))


def test_failed_background_fsync_in_interval_mode_fails_the_journal(
    make_journal: Any, journal_dir: Path
) -> None:
    """In "interval" mode the background fsync failing is fatal too: later calls raise."""
    journal = make_journal(segment_bytes=1 * MIB, durability="interval", interval_ms=10)
    acked = acknowledge(journal, 1, 5)
    _journal._set_fault("sync", 1, errno.EIO)
    journal.sync(journal.append(b"written, never fsynced"))  # sync waits for the write only
    give_up = time.monotonic() + 120
    while not journal.failed and time.monotonic() < give_up:
        time.sleep(0.01)
    assert journal.failed, "the background fsync never ran or its failure went unnoticed"
    assert_refuses_work(journal)
    journal.close()
    _journal._clear_faults()
    records, _ = reopen_and_replay(journal_dir, segment_bytes=1 * MIB)
    assert records[:5] == acked


def test_failed_fsync_at_close_raises_and_still_releases_the_directory(
    make_journal: Any, journal_dir: Path
) -> None:
    """close() reports its failed final fsync (never swallowed) and still unlocks the journal."""
    journal = make_journal(segment_bytes=1 * MIB, durability="never")
    journal.append(b"pending at close")
    _journal._set_fault("sync", 1, errno.EIO)
    with pytest.raises(JournalFailed):
        journal.close()
    assert journal.closed
    _journal._clear_faults()
    with Journal(journal_dir, segment_bytes=1 * MIB) as again:
        assert [p for _, p in again.replay()] in ([], [b"pending at close"])


# --- write fails -------------------------------------------------------------------------------


@pytest.mark.parametrize("short_bytes", [0, 5, 31, 32, 200, 1000], ids=lambda n: f"short{n}")
@pytest.mark.parametrize("prealloc", ["zero", "none"])
def test_failed_write_fails_the_journal_and_reopen_recovers_exactly_the_acknowledged_prefix(
    make_journal: Any, journal_dir: Path, short_bytes: int, prealloc: str
) -> None:
    """ENOSPC mid-segment after part of a frame was written: JournalFailed; the part is torn."""
    journal = make_journal(segment_bytes=1 * MIB, prealloc=prealloc)
    acked = acknowledge(journal, 1, 30)
    pending = [payload_for(i, 300) for i in range(31, 41)]  # one frame of ~3 KiB
    for p in pending:
        journal.append(p)
    _journal._set_fault("write", 1, errno.ENOSPC, short_bytes)
    with pytest.raises(JournalFailed, match="write"):
        journal.sync()
    assert journal.failed
    assert journal.durable_seq == 30
    assert_refuses_work(journal)
    journal.close()
    _journal._clear_faults()

    records, next_seq = reopen_and_replay(journal_dir, segment_bytes=1 * MIB, prealloc=prealloc)
    assert records == acked
    assert next_seq == 31
    with Journal(journal_dir, segment_bytes=1 * MIB, prealloc=prealloc) as journal:
        assert journal.append(b"after recovery") == 31
        journal.sync()
    records, _ = reopen_and_replay(journal_dir, segment_bytes=1 * MIB, prealloc=prealloc)
    assert records == [*acked, (31, b"after recovery")]


def test_failed_write_is_journal_failed_not_storage_full(make_journal: Any) -> None:
    """A full disk inside a segment is fatal (JournalFailed), unlike a full disk at a roll."""
    journal = make_journal(segment_bytes=1 * MIB)
    acknowledge(journal, 1, 3)
    journal.append(b"x")
    _journal._set_fault("write", 1, errno.ENOSPC)
    with pytest.raises(JournalFailed) as caught:
        journal.sync()
    assert not isinstance(caught.value, StorageFull)


# --- no room for the next segment --------------------------------------------------------------


def _append_until_storage_full(journal: Any, first: int, limit: int) -> tuple[list[bytes], int]:
    """Append records until one raises StorageFull; return the appended payloads and the index."""
    appended = []
    for i in range(first, first + limit):
        p = payload_for(i, 1000)
        before = journal.next_seq
        try:
            seq = journal.append(p)
        except StorageFull:
            assert journal.next_seq == before, "the refused append took a seq"
            return appended, i
        assert seq == before
        appended.append(p)
    raise AssertionError(f"no StorageFull after {limit} appends")


@pytest.mark.parametrize(
    "code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG], ids=["ENOSPC", "EDQUOT", "EFBIG"]
)
def test_no_room_for_the_next_segment_raises_storage_full_and_takes_no_seq(
    make_journal: Any, journal_dir: Path, code: int
) -> None:
    """The append that needs a segment nobody can prepare gets StorageFull; nothing else changes."""
    journal = make_journal(segment_bytes=64 * KIB)
    _journal._set_fault("prepare", 1, code)
    appended, failed_at = _append_until_storage_full(journal, 1, 500)
    assert StorageFull.retriable
    assert not journal.failed
    # The records before it are intact and can still be made durable.
    journal.sync()
    assert journal.durable_seq == len(appended)
    assert [p for _, p in journal.replay()] == appended
    # Still no room: still refused, still no seq, and append_many too.
    with pytest.raises(StorageFull):
        journal.append(payload_for(failed_at, 1000))
    with pytest.raises(StorageFull):
        journal.append_many([payload_for(failed_at, 1000)] * 3)
    assert journal.next_seq == len(appended) + 1

    _journal._clear_faults()  # space was freed
    more = [payload_for(i, 1000) for i in range(failed_at, failed_at + 200)]
    seqs = [journal.append(p) for p in more]
    assert seqs == list(range(len(appended) + 1, len(appended) + 201))
    journal.sync()
    assert len(journal.segments()) > 1
    journal.close()
    records, next_seq = reopen_and_replay(journal_dir, segment_bytes=64 * KIB)
    assert records == list(enumerate(appended + more, start=1))
    assert next_seq == len(records) + 1


def test_storage_full_during_append_many_takes_no_seq(make_journal: Any, journal_dir: Path) -> None:
    """A batch that needs a new segment nobody can prepare is refused whole."""
    journal = make_journal(segment_bytes=64 * KIB)
    _journal._set_fault("prepare", 1, errno.ENOSPC)
    batch = [payload_for(i, 2000) for i in range(8)]
    last = 0
    with pytest.raises(StorageFull):
        for _ in range(100):
            last = journal.append_many(batch)
    assert journal.next_seq == last + 1
    journal.sync()
    _journal._clear_faults()
    assert journal.append_many(batch) == last + 8
    journal.close()
    records, _ = reopen_and_replay(journal_dir, segment_bytes=64 * KIB)
    assert [s for s, _ in records] == list(range(1, last + 9))
    assert [p for _, p in records] == batch * ((last + 8) // 8)


def _fill_segment_to_the_brim(journal: Any) -> None:
    """With preparing segments failing, sync empty records until not even one more fits."""
    with pytest.raises(StorageFull):
        for _ in range(100_000):
            journal.sync(journal.append(b""))


def test_release_before_refused_for_lack_of_room_makes_the_floor_durable_when_retried(
    make_journal: Any, journal_dir: Path, tmp_path: Path
) -> None:
    """A release_before that hit StorageFull, retried once there is room, leaves a durable floor."""
    journal = make_journal(segment_bytes=64 * KIB)
    acknowledge(journal, 1, 20, size=1000)
    _journal._set_fault("prepare", 1, errno.ENOSPC)
    _fill_segment_to_the_brim(journal)  # now even the LOWWATER frame needs a new segment
    with pytest.raises(StorageFull):
        journal.release_before(10)
    _journal._clear_faults()
    journal.release_before(10)  # returned: the floor is durable (docs/journal.md)
    assert journal.floor == 10
    # Crash now: the segment files as they are while the journal is still open.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for segment in journal_dir.glob("*.seg"):
        shutil.copyfile(segment, crashed / segment.name)
    with Journal(crashed, segment_bytes=64 * KIB) as recovered:
        assert recovered.floor == 10
        assert next(iter(recovered.replay()))[0] == 10


def test_close_with_a_full_segment_and_no_room_writes_everything_and_unlocks(
    make_journal: Any, journal_dir: Path
) -> None:
    """close() on a brim-full segment with a full disk still writes, fsyncs and unlocks."""
    journal = make_journal(segment_bytes=64 * KIB)
    _journal._set_fault("prepare", 1, errno.ENOSPC)
    appended, _ = _append_until_storage_full(journal, 1, 500)  # appended, never synced
    with pytest.raises(StorageFull):
        for _ in range(100_000):  # empty records fill what is left, so not even CLOSE fits
            journal.append(b"")
            appended.append(b"")
    journal.close()  # documented to raise only JournalFailed
    assert journal.closed
    _journal._clear_faults()
    records, _ = reopen_and_replay(journal_dir, segment_bytes=64 * KIB)
    assert records == list(enumerate(appended, start=1))


def test_no_room_for_the_first_segment_raises_storage_full_at_open(journal_dir: Path) -> None:
    """A new journal that cannot prepare its first segment refuses to open and holds no lock."""
    _journal._set_fault("prepare", 1, errno.ENOSPC)
    with pytest.raises(StorageFull):
        Journal(journal_dir, segment_bytes=64 * KIB)
    _journal._clear_faults()
    assert list(journal_dir.glob("*.seg")) == []
    assert list(journal_dir.glob("*.tmp")) == []
    with Journal(journal_dir, segment_bytes=64 * KIB) as journal:
        assert journal.append(b"first") == 1


# --- real kernel errors: RLIMIT_FSIZE makes write() past the limit fail with EFBIG --------------

_FSIZE_CHILD = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    from pmq._journal import Journal
    from pmq.errors import JournalFailed, StorageFull

    def limit(nbytes):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))

    def lift():
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))

    def say(**event):
        print(json.dumps(event), flush=True)

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() past the limit returns EFBIG
    directory, scenario = sys.argv[1], sys.argv[2]
    """
)

_GROW_UNTIL_EFBIG = """
# (a) prealloc="none": the segment grows by writes until one crosses the limit.
limit(200 * 1024)
journal = Journal(directory, segment_bytes=1024 * 1024, prealloc="none")
i = 0
try:
    while True:
        payload = (b"efbig-%d;" % i) * 300
        seq = journal.append(payload)
        journal.sync(seq)
        say(acked=seq, i=i)
        i += 1
except JournalFailed as error:
    say(error="JournalFailed", failed=journal.failed, message=str(error))
except BaseException as error:
    say(error=type(error).__name__, message=str(error))
journal.close()
"""

_OPEN_UNDER_LIMIT = """
# (b1) a new journal whose first zero-filled segment is over the limit.
limit(512 * 1024)
try:
    Journal(directory, segment_bytes=1024 * 1024, prealloc="zero").close()
    say(open="ok")
except StorageFull as error:
    say(open="StorageFull", message=str(error))
except BaseException as error:
    say(open=type(error).__name__, message=str(error))
lift()
with Journal(directory, segment_bytes=1024 * 1024, prealloc="zero") as journal:
    journal.sync(journal.append(b"after the limit was lifted"))
    say(lifted=journal.durable_seq)
"""

_ROLL_UNDER_LIMIT = """
# (b2) an existing 1 MiB segment; frames of 256 KiB stay below the limit, the next segment cannot.
limit(800000)
journal = Journal(directory, segment_bytes=1024 * 1024, prealloc="zero")
big = journal.max_payload_bytes // 2
for i in range(3):
    seq = journal.append(bytes([i]) * big)
    journal.sync(seq)
    say(acked=seq)
before = journal.next_seq
try:
    journal.append(b"\\x03" * big)
    say(roll="ok")
except StorageFull as error:
    say(roll="StorageFull", next_seq_before=before, next_seq_after=journal.next_seq,
        failed=journal.failed, message=str(error))
except BaseException as error:
    say(roll=type(error).__name__, message=str(error))
journal.sync()
lift()
seq = journal.append(b"\\x03" * big)
journal.sync(seq)
say(after_lift=seq)
journal.close()
"""


def _run_fsize_child(directory: Path, body: str) -> list[dict[str, Any]]:
    """Run one RLIMIT_FSIZE scenario in a child; return the events it printed."""
    result = subprocess.run(
        [sys.executable, "-c", _FSIZE_CHILD + body, str(directory), "scenario"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


needs_fsize_limit = pytest.mark.skipif(
    sys.platform == "win32", reason="RLIMIT_FSIZE and SIGXFSZ are POSIX"
)


@needs_fsize_limit
def test_real_efbig_inside_a_segment_fails_the_journal_and_keeps_every_ack(
    journal_dir: Path,
) -> None:
    """write() past RLIMIT_FSIZE (EFBIG) mid-segment: JournalFailed; reopen has every ack."""
    events = _run_fsize_child(journal_dir, _GROW_UNTIL_EFBIG)
    acked = [e for e in events if "acked" in e]
    assert acked, events
    assert events[-1]["error"] == "JournalFailed", events[-1]
    assert events[-1]["failed"] is True
    records, next_seq = reopen_and_replay(journal_dir, segment_bytes=1 * MIB, prealloc="none")
    expected = [(e["acked"], (b"efbig-%d;" % e["i"]) * 300) for e in acked]
    assert [s for s, _ in expected] == list(range(1, len(expected) + 1))
    assert records == expected  # exactly the acknowledged prefix: the crossing frame was torn
    assert next_seq == len(expected) + 1


@needs_fsize_limit
def test_real_efbig_preparing_the_first_segment_raises_storage_full_at_open(
    journal_dir: Path,
) -> None:
    """A new journal whose first zero-filled segment is over RLIMIT_FSIZE: StorageFull at open."""
    events = _run_fsize_child(journal_dir, _OPEN_UNDER_LIMIT)
    assert events[0]["open"] == "StorageFull", events
    assert events[1] == {"lifted": 1}
    records, _ = reopen_and_replay(journal_dir, segment_bytes=1 * MIB)
    assert records == [(1, b"after the limit was lifted")]


@needs_fsize_limit
def test_real_efbig_preparing_the_next_segment_raises_storage_full_and_recovers(
    journal_dir: Path,
) -> None:
    """The roll that cannot zero-fill a segment under RLIMIT_FSIZE: StorageFull, then it works."""
    with Journal(journal_dir, segment_bytes=1 * MIB, prealloc="zero") as journal:
        big = journal.max_payload_bytes // 2
    events = _run_fsize_child(journal_dir, _ROLL_UNDER_LIMIT)
    assert [e["acked"] for e in events if "acked" in e] == [1, 2, 3], events
    roll = next(e for e in events if "roll" in e)
    assert roll["roll"] == "StorageFull", roll
    assert roll["next_seq_before"] == roll["next_seq_after"] == 4
    assert roll["failed"] is False
    assert events[-1] == {"after_lift": 4}
    records, next_seq = reopen_and_replay(journal_dir, segment_bytes=1 * MIB)
    assert records == [(i + 1, bytes([i]) * big) for i in range(4)]
    assert next_seq == 5
