"""The journal's public API and every error path it documents (docs/journal.md).

Runs against the installed ``pmq._journal``. Crash behaviour lives in test_journal_crash.py,
injected I/O faults in test_journal_faults.py and the on-disk bytes in test_journal_format.py.
No assertion here depends on how long something took: where the journal works in the background
("interval" mode), the test polls with a generous limit and fails only if nothing ever happens.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import wait_until
from pmq import _journal
from pmq._journal import Journal
from pmq.errors import JournalError, JournalLocked

KIB = 1024
MIB = 1024 * KIB


def payload_for(seq_hint: int, size: int = 24) -> bytes:
    """A deterministic payload of ``size`` bytes that names ``seq_hint``."""
    head = b"rec-%d;" % seq_hint
    return (head * (size // len(head) + 1))[:size]


def replayed(journal: Any, *args: int | None) -> list[tuple[int, bytes]]:
    """Everything ``journal.replay(*args)`` yields, as a list."""
    return list(journal.replay(*args))


def wait_for(predicate: Any, limit_s: float = 60.0) -> bool:
    """Poll ``predicate`` until it holds or ``limit_s`` passed; return whether it held."""
    give_up = time.monotonic() + limit_s
    while time.monotonic() < give_up:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


# --- module surface ----------------------------------------------------------------------------


def test_module_constants_match_the_format() -> None:
    """The module exports the sizes docs/FORMAT.md and docs/journal.md state."""
    assert _journal.SEGMENT_HEADER_BYTES == 4096
    assert _journal.FRAME_HEADER_BYTES == 32
    assert _journal.RECORD_HEADER_BYTES == 8
    assert _journal.MIN_SEGMENT_BYTES == 64 * KIB
    assert _journal.DEFAULT_SEGMENT_BYTES == 64 * MIB


def test_new_journal_starts_empty_at_seq_one(make_journal: Any) -> None:
    """A journal made in an empty directory hands out seq 1 first and replays nothing."""
    journal = make_journal(segment_bytes=64 * KIB)
    assert journal.next_seq == 1
    assert journal.written_seq == 0
    assert journal.durable_seq == 0
    assert journal.floor <= 1
    assert not journal.closed
    assert not journal.failed
    assert replayed(journal) == []


def test_journal_reports_its_configuration(make_journal: Any, journal_dir: Path) -> None:
    """The attributes echo the keywords, and the payload limit is the frame limit minus 40."""
    journal = make_journal(segment_bytes=1 * MIB, durability="never", prealloc="none")
    assert Path(journal.directory) == journal_dir
    assert journal.durability == "never"
    assert journal.prealloc == "none"
    assert journal.segment_bytes == 1 * MIB
    # "min(16 MiB, half a segment)": half of what a segment holds after its header and SEAL room.
    assert 512 * KIB - 4096 <= journal.max_frame_bytes <= 512 * KIB
    assert journal.max_frame_bytes % 8 == 0
    assert journal.max_payload_bytes == journal.max_frame_bytes - 40
    assert isinstance(journal.journal_id, bytes)
    assert len(journal.journal_id) == 16
    assert journal.salvaged == []


@pytest.mark.skipif(sys.platform != "linux", reason="the prealloc defaults named here are Linux's")
@pytest.mark.parametrize(
    ("durability", "expected"),
    [("always", "zero"), ("interval", "allocate"), ("never", "allocate")],
)
def test_prealloc_default_depends_on_durability_on_linux(
    make_journal: Any, durability: str, expected: str
) -> None:
    """On Linux the next segment is zero-filled with "always" and fallocated otherwise."""
    journal = make_journal(segment_bytes=64 * KIB, durability=durability)
    assert journal.prealloc == expected


def test_journal_id_survives_reopen_and_differs_between_journals(
    make_journal: Any, tmp_path: Path
) -> None:
    """A journal keeps its random id across reopens; another directory gets another id."""
    first = make_journal(segment_bytes=64 * KIB)
    first_id = first.journal_id
    first.close()
    assert make_journal(segment_bytes=64 * KIB).journal_id == first_id
    other = tmp_path / "other"
    other.mkdir()
    assert make_journal(other, segment_bytes=64 * KIB).journal_id != first_id


@pytest.mark.parametrize(
    "kwargs",
    [
        {"segment_bytes": 64 * KIB - 1},
        {"segment_bytes": 0},
        {"durability": "sometimes"},
        {"prealloc": "maybe"},
        {"on_corruption": "ignore"},
        {"interval_ms": -1.0, "durability": "interval"},
    ],
    ids=[
        "segment-too-small",
        "segment-zero",
        "durability",
        "prealloc",
        "on-corruption",
        "interval",
    ],
)
def test_bad_keyword_values_raise_value_error(journal_dir: Path, kwargs: dict[str, Any]) -> None:
    """An out-of-range or unknown option is refused with ValueError before anything opens."""
    options = {"segment_bytes": 64 * KIB, **kwargs}
    with pytest.raises(ValueError):
        Journal(journal_dir, **options).close()


# --- append / append_many ----------------------------------------------------------------------


def test_append_returns_consecutive_seqs(make_journal: Any) -> None:
    """Each append takes the next seq, starting at 1, and next_seq follows."""
    journal = make_journal(segment_bytes=64 * KIB)
    seqs = [journal.append(payload_for(i)) for i in range(1, 11)]
    assert seqs == list(range(1, 11))
    assert journal.next_seq == 11


def test_append_many_returns_the_last_seq_of_its_batch(make_journal: Any) -> None:
    """append_many gives its payloads consecutive seqs and returns the last one."""
    journal = make_journal(segment_bytes=64 * KIB)
    assert journal.append(b"one") == 1
    assert journal.append_many([b"two", b"three", b"four"]) == 4
    assert journal.append_many([b"five"]) == 5
    assert journal.append_many(iter([b"six", b"seven"])) == 7  # any iterable
    assert journal.append(b"eight") == 8
    journal.sync()
    assert [p for _, p in replayed(journal)] == [
        b"one",
        b"two",
        b"three",
        b"four",
        b"five",
        b"six",
        b"seven",
        b"eight",
    ]


def test_append_accepts_any_bytes_like_payload(make_journal: Any) -> None:
    """bytearray, memoryview and empty payloads are stored and replay as bytes."""
    journal = make_journal(segment_bytes=64 * KIB)
    journal.append(bytearray(b"from a bytearray"))
    journal.append(memoryview(b"xx from a memoryview xx")[3:-3])
    journal.append(b"")
    journal.append_many([bytearray(b"a"), memoryview(b"b"), b""])
    journal.sync()
    records = replayed(journal)
    assert [p for _, p in records] == [
        b"from a bytearray",
        b"from a memoryview",
        b"",
        b"a",
        b"b",
        b"",
    ]
    assert all(type(p) is bytes for _, p in records)


def test_appended_bytearray_is_copied_at_append_time(make_journal: Any) -> None:
    """Changing a bytearray after append does not change the record (append copies it)."""
    journal = make_journal(segment_bytes=64 * KIB)
    buffer = bytearray(b"before")
    seq = journal.append(buffer)
    buffer[:] = b"after!"
    journal.sync(seq)
    assert replayed(journal) == [(1, b"before")]


@pytest.mark.parametrize(
    "bad", ["text", 42, None, 3.5, [b"a"]], ids=["str", "int", "None", "float", "list"]
)
def test_append_of_non_bytes_raises_type_error_and_takes_no_seq(
    make_journal: Any, bad: Any
) -> None:
    """A payload that is not bytes-like raises TypeError naming the problem; no seq is used."""
    journal = make_journal(segment_bytes=64 * KIB)
    journal.append(b"first")
    with pytest.raises(TypeError, match=r"(?i)bytes|buffer"):
        journal.append(bad)
    assert journal.next_seq == 2
    assert journal.append(b"second") == 2


@pytest.mark.parametrize("bad", ["text", 42, None], ids=["str", "int", "None"])
def test_append_many_with_a_non_bytes_item_raises_type_error_and_takes_no_seq(
    make_journal: Any, bad: Any
) -> None:
    """One bad item rejects the whole batch: TypeError, nothing appended, no seq used."""
    journal = make_journal(segment_bytes=64 * KIB)
    journal.append(b"first")
    with pytest.raises(TypeError, match=r"(?i)bytes|buffer"):
        journal.append_many([b"ok", bad, b"ok too"])
    assert journal.next_seq == 2
    journal.sync()
    assert replayed(journal) == [(1, b"first")]


def test_append_many_of_a_non_iterable_raises_type_error(make_journal: Any) -> None:
    """append_many needs an iterable of payloads."""
    journal = make_journal(segment_bytes=64 * KIB)
    with pytest.raises(TypeError):
        journal.append_many(42)
    assert journal.next_seq == 1


def test_payload_of_exactly_max_payload_bytes_is_accepted(make_journal: Any) -> None:
    """The largest allowed payload fits in one frame and replays intact."""
    journal = make_journal(segment_bytes=64 * KIB)
    big = os.urandom(journal.max_payload_bytes)
    seq = journal.append(big)
    journal.sync(seq)
    assert replayed(journal) == [(1, big)]


def test_payload_over_max_payload_bytes_raises_value_error_naming_the_limit(
    make_journal: Any,
) -> None:
    """A payload one byte over the limit raises ValueError that names the limit; no seq is used."""
    journal = make_journal(segment_bytes=64 * KIB)
    limit = journal.max_payload_bytes
    with pytest.raises(ValueError, match=str(limit)):
        journal.append(bytes(limit + 1))
    assert journal.next_seq == 1
    with pytest.raises(ValueError, match=f"{limit}|{journal.max_frame_bytes}"):
        journal.append_many([b"small", bytes(limit + 1)])
    assert journal.next_seq == 1


def test_append_many_over_max_frame_bytes_raises_value_error_naming_the_limit(
    make_journal: Any,
) -> None:
    """A batch whose payloads each fit but together exceed one frame is refused whole."""
    journal = make_journal(segment_bytes=64 * KIB)
    third = journal.max_frame_bytes // 3
    batch = [bytes(third), bytes(third), bytes(third)]  # 3 record headers + frame header overflow
    journal.append(b"before")
    with pytest.raises(ValueError, match=str(journal.max_frame_bytes)):
        journal.append_many(batch)
    assert journal.next_seq == 2
    journal.sync()
    assert replayed(journal) == [(1, b"before")]


def test_append_many_of_more_than_65535_records_raises_value_error(make_journal: Any) -> None:
    """One frame holds at most 65535 records (FORMAT.md), so a bigger batch is refused whole."""
    journal = make_journal(segment_bytes=4 * MIB)
    with pytest.raises(ValueError):
        journal.append_many([b""] * 65536)
    assert journal.next_seq == 1
    assert journal.append_many([b""] * 65535) == 65535


def test_append_many_of_no_payloads_raises_value_error(make_journal: Any) -> None:
    """An empty batch is refused: a frame holds at least one record."""
    journal = make_journal(segment_bytes=64 * KIB)
    with pytest.raises(ValueError):
        journal.append_many([])
    assert journal.next_seq == 1


# --- sync and the three marks ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["sync", "sync_async"])
def test_sync_of_a_seq_not_yet_appended_raises_value_error(make_journal: Any, how: str) -> None:
    """Waiting for a seq nobody appended is refused at once instead of blocking forever."""
    journal = make_journal(segment_bytes=64 * KIB)
    journal.append(b"a")
    if how == "sync":
        with pytest.raises(ValueError, match="2"):
            journal.sync(2)
    else:

        async def main() -> None:
            with pytest.raises(ValueError, match="2"):
                await journal.sync_async(2)

        asyncio.run(main())
    journal.sync(1)
    assert journal.durable_seq == 1


def test_append_alone_writes_nothing_in_always_mode(make_journal: Any) -> None:
    """Appended records are pending: written_seq and durable_seq move only at a sync."""
    journal = make_journal(segment_bytes=64 * KIB)
    journal.append(b"a")
    journal.append(b"b")
    assert journal.next_seq == 3
    assert journal.written_seq == 0
    assert journal.durable_seq == 0


def test_sync_none_makes_everything_appended_durable_in_always_mode(make_journal: Any) -> None:
    """sync() with no seq covers every record appended so far."""
    journal = make_journal(segment_bytes=64 * KIB)
    for i in range(5):
        journal.append(payload_for(i))
    journal.append_many([b"x", b"y"])
    journal.sync()
    assert journal.durable_seq == 7
    assert journal.written_seq == 7
    assert journal.next_seq == 8


def test_sync_of_a_seq_makes_at_least_that_seq_durable(make_journal: Any) -> None:
    """sync(seq) returns with seq durable; durable never passes written."""
    journal = make_journal(segment_bytes=64 * KIB)
    for i in range(1, 6):
        journal.append(payload_for(i))
    journal.sync(3)
    assert journal.durable_seq >= 3
    assert journal.written_seq >= journal.durable_seq
    journal.sync(5)
    assert journal.durable_seq == 5


def test_sync_of_an_already_durable_seq_does_no_fsync(make_journal: Any) -> None:
    """Syncing what is already durable returns at once without another fsync."""
    journal = make_journal(segment_bytes=64 * KIB)
    journal.sync(journal.append(b"a"))
    before = journal.stats()["fsyncs"]
    journal.sync(1)
    journal.sync()
    assert journal.stats()["fsyncs"] == before


def test_lone_producer_pays_exactly_one_fsync_per_sync_in_always_mode(make_journal: Any) -> None:
    """One thread appending then syncing costs exactly one fsync per sync."""
    journal = make_journal(segment_bytes=1 * MIB)
    for i in range(20):
        before = journal.stats()
        journal.append(payload_for(i))
        if i % 3 == 0:
            journal.append_many([payload_for(i, 10), payload_for(i, 11)])
        journal.sync()
        after = journal.stats()
        assert after["fsyncs"] - before["fsyncs"] == 1, (i, before, after)


def test_never_mode_sync_writes_without_fsync(make_journal: Any) -> None:
    """In "never" mode sync hands the records to the OS but fsyncs nothing."""
    journal = make_journal(segment_bytes=1 * MIB, durability="never")
    before = journal.stats()["fsyncs"]
    seq = journal.append(b"a")
    journal.append(b"b")
    journal.sync(seq)
    assert journal.written_seq >= seq
    journal.sync()
    assert journal.written_seq == 2
    assert journal.durable_seq == 0
    assert journal.stats()["fsyncs"] == before


def test_never_mode_records_survive_a_clean_close(make_journal: Any) -> None:
    """close() makes a "never" journal's records durable, so a reopen finds them all."""
    journal = make_journal(segment_bytes=1 * MIB, durability="never")
    for i in range(1, 101):
        journal.append(payload_for(i))
    journal.sync()
    journal.close()
    reopened = make_journal(segment_bytes=1 * MIB, durability="never")
    assert replayed(reopened) == [(i, payload_for(i)) for i in range(1, 101)]


def test_interval_mode_sync_returns_once_written_and_fsyncs_in_the_background(
    make_journal: Any,
) -> None:
    """In "interval" mode sync waits for the write; the background fsync catches up later."""
    journal = make_journal(segment_bytes=1 * MIB, durability="interval", interval_ms=20)
    for i in range(1, 51):
        journal.append(payload_for(i))
    journal.sync()
    assert journal.written_seq == 50
    assert journal.durable_seq <= journal.written_seq
    assert wait_for(lambda: journal.durable_seq == 50), journal.durable_seq
    assert journal.stats()["fsyncs"] >= 1


def test_interval_mode_keeps_fsyncing_later_writes(make_journal: Any) -> None:
    """The background fsync is not a one-off: a second batch also becomes durable."""
    journal = make_journal(segment_bytes=1 * MIB, durability="interval", interval_ms=20)
    journal.sync(journal.append(b"first"))
    assert wait_for(lambda: journal.durable_seq == 1)
    journal.append_many([b"second", b"third"])
    journal.sync()
    assert wait_for(lambda: journal.durable_seq == 3), journal.durable_seq


def test_marks_are_restored_by_reopen(make_journal: Any) -> None:
    """After a clean close and reopen, every mark points at the last record."""
    journal = make_journal(segment_bytes=64 * KIB)
    journal.append_many([payload_for(i) for i in range(1, 31)])
    journal.append(b"last")
    journal.close()
    reopened = make_journal(segment_bytes=64 * KIB)
    assert reopened.next_seq == 32
    assert reopened.written_seq == 31
    assert reopened.durable_seq == 31
    assert reopened.append(b"next") == 32


def test_close_makes_pending_appends_durable(make_journal: Any) -> None:
    """Records appended but never synced are written by close()."""
    journal = make_journal(segment_bytes=64 * KIB)
    journal.append(b"pending one")
    journal.append_many([b"pending two", b"pending three"])
    journal.close()
    reopened = make_journal(segment_bytes=64 * KIB)
    assert replayed(reopened) == [(1, b"pending one"), (2, b"pending two"), (3, b"pending three")]


# --- replay ------------------------------------------------------------------------------------


def test_replay_yields_the_half_open_range_asked_for(make_journal: Any) -> None:
    """replay(start, stop) yields start <= seq < stop, in order; stop=None means to the end."""
    journal = make_journal(segment_bytes=64 * KIB)
    expected = [(i, payload_for(i)) for i in range(1, 21)]
    for _, p in expected:
        journal.append(p)
    journal.sync()
    assert replayed(journal) == expected
    assert replayed(journal, 1) == expected
    assert replayed(journal, 5) == expected[4:]
    assert replayed(journal, 5, 9) == expected[4:8]
    assert replayed(journal, 5, None) == expected[4:]
    assert replayed(journal, 20, 21) == expected[19:]
    assert replayed(journal, 7, 7) == []
    assert replayed(journal, 21) == []
    assert replayed(journal, 1000) == []
    assert replayed(journal, 1, 1000) == expected


def test_replay_splits_nothing_across_segments(make_journal: Any) -> None:
    """A replay range that crosses segment boundaries yields every record once, in order."""
    journal = make_journal(segment_bytes=64 * KIB)
    expected = [(i, payload_for(i, 3000 + i)) for i in range(1, 101)]
    for _, p in expected:
        journal.append(p)
    journal.sync()
    assert len(journal.segments()) > 3
    assert replayed(journal) == expected
    assert replayed(journal, 33, 77) == expected[32:76]


def test_replay_from_anywhere_in_a_big_segment_agrees_with_a_full_replay(
    make_journal: Any,
) -> None:
    """replay() jumps to the last frame it remembers before `start` (one per MARK_BYTES) instead
    of walking the segment from its start: from any start, in any order, with frames of one and
    of many records and appends between the reads, it yields what a full replay yields."""
    journal = make_journal(segment_bytes=8 * 1024 * KIB)
    rng = random.Random(7)
    expected: list[tuple[int, bytes]] = []

    def grow(frames: int) -> None:
        for _ in range(frames):
            batch = [payload_for(len(expected) + i + 1, rng.randrange(10, 600))
                     for i in range(rng.choice((1, 1, 5, 40)))]
            last = journal.append_many(batch) if len(batch) > 1 else journal.append(batch[0])
            expected.extend(zip(range(last - len(batch) + 1, last + 1), batch, strict=True))
        journal.sync()

    grow(300)
    assert len(journal.segments()) == 1
    assert sum(len(payload) for _, payload in expected) > 4 * _journal.MARK_BYTES
    for _ in range(3):
        for start in rng.sample(range(1, len(expected) + 1), 40):
            stop = start + rng.randrange(1, 50)
            assert replayed(journal, start, stop) == expected[start - 1:stop - 1], (start, stop)
        grow(100)
    assert replayed(journal) == expected


def test_replay_is_restartable_and_independent(make_journal: Any) -> None:
    """Two replays can run at once and each sees the whole range."""
    journal = make_journal(segment_bytes=64 * KIB)
    for i in range(1, 11):
        journal.append(payload_for(i))
    journal.sync()
    first = journal.replay()
    second = journal.replay(3)
    assert next(first) == (1, payload_for(1))
    assert next(second) == (3, payload_for(3))
    assert [s for s, _ in first] == list(range(2, 11))
    assert [s for s, _ in second] == list(range(4, 11))


# --- segments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("segment_bytes", "total_bytes"),
    [(64 * KIB, 1 * MIB), (1 * MIB, 6 * MIB)],
    ids=["64KiB", "1MiB"],
)
def test_segments_roll_and_every_record_survives_reopen(
    make_journal: Any, segment_bytes: int, total_bytes: int
) -> None:
    """Filling many segments rolls to new files; a reopen replays every record exactly."""
    journal = make_journal(segment_bytes=segment_bytes)
    limit = journal.max_payload_bytes
    sizes = [0, 1, 7, 8, 100, 1000, 4000, limit // 3, limit // 2, limit - 8, limit]
    expected: list[tuple[int, bytes]] = []
    written = 0
    i = 0
    while written < total_bytes:
        size = sizes[i % len(sizes)]
        i += 1
        if i % 5 == 0:
            batch = [payload_for(len(expected) + k + 1, size // 5) for k in range(4)]
            last = journal.append_many(batch)
            expected.extend(zip(range(last - 3, last + 1), batch, strict=True))
        else:
            p = payload_for(len(expected) + 1, size)
            expected.append((journal.append(p), p))
        written += size
        if i % 7 == 0:
            journal.sync()
    journal.sync()
    assert [s for s, _ in expected] == list(range(1, len(expected) + 1))

    segments = journal.segments()
    assert len(segments) >= total_bytes // segment_bytes
    assert [s.active for s in segments] == [False] * (len(segments) - 1) + [True]
    bases = [s.base_seq for s in segments]
    assert bases[0] == 1
    assert bases == sorted(set(bases))
    for info in segments:
        assert Path(info.path).name == f"{info.base_seq:020d}.seg"
        assert Path(info.path).exists()
        assert info.size_bytes <= segment_bytes
    assert replayed(journal) == expected
    journal.close()

    reopened = make_journal(segment_bytes=segment_bytes)
    assert [s.base_seq for s in reopened.segments()] == bases
    assert replayed(reopened) == expected
    assert reopened.next_seq == len(expected) + 1


def test_segment_files_are_named_by_their_first_seq(make_journal: Any, journal_dir: Path) -> None:
    """Every *.seg file in the directory is a segment that segments() lists."""
    journal = make_journal(segment_bytes=64 * KIB)
    for i in range(1, 201):
        journal.append(payload_for(i, 1000))
    journal.sync()
    listed = {Path(s.path).name for s in journal.segments()}
    on_disk = {p.name for p in journal_dir.glob("*.seg")}
    assert listed == on_disk
    assert len(on_disk) > 1


@pytest.mark.parametrize("writer", ["append", "append_many"])
def test_the_next_segment_is_prepared_before_the_active_one_fills(
    make_journal: Any, journal_dir: Path, writer: str
) -> None:
    """Past half of a segment, a spare appears in the background, whichever way records come."""
    journal = make_journal(segment_bytes=256 * KIB)
    payloads = [payload_for(i, 1000) for i in range(1, 151)]  # ~150 KiB: past half, no roll
    if writer == "append":
        for payload in payloads:
            journal.append(payload)
    else:
        journal.append_many(payloads[:75])  # a frame holds at most half a segment
        journal.append_many(payloads[75:])
    journal.sync()
    assert len(journal.segments()) == 1
    wait_until(lambda: any(journal_dir.glob("spare-*.tmp")), "a spare segment to be prepared")


# --- release_before and copy_forward -----------------------------------------------------------


def _fill(journal: Any, count: int, size: int = 2000) -> list[tuple[int, bytes]]:
    """Append ``count`` records of ``size`` bytes, sync, and return them."""
    records = []
    for _ in range(count):
        p = payload_for(journal.next_seq, size)
        records.append((journal.append(p), p))
    journal.sync()
    return records


def test_release_before_deletes_whole_segments_below_the_floor(
    make_journal: Any, journal_dir: Path
) -> None:
    """Segments whose records all lie below the floor are deleted; the others stay."""
    journal = make_journal(segment_bytes=64 * KIB)
    records = _fill(journal, 300)
    segments = journal.segments()
    assert len(segments) >= 6
    floor = segments[3].base_seq + 1  # inside the fourth segment
    deleted = journal.release_before(floor)
    assert deleted == 3
    assert journal.floor == floor
    remaining = journal.segments()
    assert [s.base_seq for s in remaining] == [s.base_seq for s in segments[3:]]
    for gone in segments[:3]:
        assert not Path(gone.path).exists()
    assert sorted(p.name for p in journal_dir.glob("*.seg")) == sorted(
        Path(s.path).name for s in remaining
    )
    assert replayed(journal) == records[floor - 1 :]


def test_records_below_the_floor_never_replay(make_journal: Any) -> None:
    """Records below the floor are skipped even where their segment is kept."""
    journal = make_journal(segment_bytes=64 * KIB)
    records = _fill(journal, 50, 200)
    assert len(journal.segments()) == 1
    assert journal.release_before(20) == 0
    assert replayed(journal) == records[19:]
    assert replayed(journal, 1, 25) == records[19:24]
    assert replayed(journal, 1, 20) == []


def test_release_before_never_deletes_the_active_segment(make_journal: Any) -> None:
    """Releasing everything keeps the active segment and the seq counter."""
    journal = make_journal(segment_bytes=64 * KIB)
    _fill(journal, 200)
    last = journal.next_seq - 1
    active = journal.segments()[-1]
    journal.release_before(journal.next_seq)
    assert [s.path for s in journal.segments()] == [active.path]
    assert Path(active.path).exists()
    assert replayed(journal) == []
    assert journal.append(b"after") == last + 1
    journal.sync()
    assert replayed(journal) == [(last + 1, b"after")]


def test_floor_survives_reopen(make_journal: Any) -> None:
    """The floor is durable: after a reopen the released records still never replay."""
    journal = make_journal(segment_bytes=64 * KIB)
    records = _fill(journal, 200)
    floor = journal.segments()[2].base_seq + 5
    journal.release_before(floor)
    segments = [s.base_seq for s in journal.segments()]
    journal.close()
    reopened = make_journal(segment_bytes=64 * KIB)
    assert reopened.floor == floor
    assert [s.base_seq for s in reopened.segments()] == segments
    assert replayed(reopened) == records[floor - 1 :]
    assert reopened.next_seq == len(records) + 1


def test_floor_survives_reopen_after_everything_was_released(make_journal: Any) -> None:
    """With every record released, a reopen replays nothing and keeps counting seqs."""
    journal = make_journal(segment_bytes=64 * KIB)
    _fill(journal, 100)
    journal.release_before(101)
    journal.close()
    reopened = make_journal(segment_bytes=64 * KIB)
    assert reopened.floor == 101
    assert replayed(reopened) == []
    assert reopened.next_seq == 101


def test_release_before_at_the_floor_deletes_segments_that_fell_below_it_since(
    make_journal: Any,
) -> None:
    """Releasing the current floor again deletes a segment that a roll since left below it."""
    journal = make_journal(segment_bytes=64 * KIB)
    biggest = bytes(journal.max_payload_bytes)  # one per 64 KiB segment
    journal.sync(journal.append(biggest))
    assert journal.release_before(2) == 0  # seq 1 is in the active segment: nothing to delete
    journal.sync(journal.append(biggest))  # rolls: segment 1 now holds only released records
    first, second = journal.segments()
    assert second.base_seq == 2
    assert journal.release_before(2) == 1
    assert [s.base_seq for s in journal.segments()] == [2]
    assert not Path(first.path).exists()


def test_floor_never_moves_backwards(make_journal: Any) -> None:
    """Releasing below the current floor changes nothing."""
    journal = make_journal(segment_bytes=64 * KIB)
    records = _fill(journal, 30, 100)
    journal.release_before(10)
    assert journal.release_before(5) == 0
    assert journal.floor == 10
    assert replayed(journal) == records[9:]


def test_release_before_a_seq_not_yet_appended_raises_value_error(make_journal: Any) -> None:
    """The floor cannot pass next_seq: releasing records that do not exist is refused."""
    journal = make_journal(segment_bytes=64 * KIB)
    _fill(journal, 5, 10)
    with pytest.raises(ValueError, match="7"):
        journal.release_before(7)
    assert journal.floor == 1
    assert journal.release_before(6) == 0  # everything appended so far: allowed
    assert journal.floor == 6


@pytest.mark.parametrize(
    "seqs", [[0], [3], [9], [5, 100]], ids=["zero", "below-floor", "future", "mixed"]
)
def test_copy_forward_of_seqs_outside_the_live_range_raises_value_error(
    make_journal: Any, seqs: list[int]
) -> None:
    """Only seqs from the floor to the last appended one can be copied; nothing is appended."""
    journal = make_journal(segment_bytes=64 * KIB)
    _fill(journal, 8, 10)
    journal.release_before(4)
    with pytest.raises(ValueError):
        journal.copy_forward(seqs)
    assert journal.next_seq == 9


def test_copy_forward_of_nothing_returns_an_empty_mapping(make_journal: Any) -> None:
    """copy_forward([]) appends nothing."""
    journal = make_journal(segment_bytes=64 * KIB)
    _fill(journal, 3, 10)
    assert journal.copy_forward([]) == {}
    assert journal.next_seq == 4


def test_copy_forward_returns_the_new_seqs_and_the_payloads_read_there(make_journal: Any) -> None:
    """copy_forward re-appends payloads durably and maps each old seq to its new one."""
    journal = make_journal(segment_bytes=64 * KIB)
    records = _fill(journal, 100)
    old = [2, 7, 50]
    first_new = journal.next_seq
    mapping = journal.copy_forward(old)
    assert mapping == {2: first_new, 7: first_new + 1, 50: first_new + 2}
    assert journal.durable_seq >= first_new + 2
    assert journal.next_seq == first_new + 3
    copied = dict(replayed(journal, first_new))
    for old_seq, new_seq in mapping.items():
        assert copied[new_seq] == records[old_seq - 1][1]


def test_copy_forward_of_a_record_not_yet_synced(make_journal: Any) -> None:
    """A record still pending in memory can be copied forward; both copies replay."""
    journal = make_journal(segment_bytes=64 * KIB)
    old = journal.append(b"pending")
    mapping = journal.copy_forward([old])
    assert mapping == {old: old + 1}
    assert replayed(journal) == [(1, b"pending"), (2, b"pending")]


def test_copied_records_outlive_the_release_of_their_originals(make_journal: Any) -> None:
    """After copy_forward the floor can pass the originals and the copies survive a reopen."""
    journal = make_journal(segment_bytes=64 * KIB)
    records = _fill(journal, 200)
    pinned = [3, 4, 40]
    mapping = journal.copy_forward(pinned)
    floor = journal.segments()[-1].base_seq
    assert journal.release_before(floor) >= 1
    journal.close()
    reopened = make_journal(segment_bytes=64 * KIB)
    survivors = dict(replayed(reopened))
    for old_seq in pinned:
        assert old_seq not in survivors
        assert survivors[mapping[old_seq]] == records[old_seq - 1][1]


# --- stats and group commit --------------------------------------------------------------------


def test_stats_counts_records_frames_and_bytes(make_journal: Any) -> None:
    """stats() has the documented counters and they grow with the work done."""
    journal = make_journal(segment_bytes=64 * KIB)
    before = journal.stats()
    for key in ("records", "frames", "flushes", "fsyncs", "bytes", "mean_batch"):
        assert key in before, key
    journal.append(b"a" * 100)
    journal.append_many([b"b" * 100, b"c" * 100, b"d" * 100])
    journal.sync()
    after = journal.stats()
    assert after["records"] - before["records"] == 4
    assert after["frames"] - before["frames"] >= 1
    assert after["fsyncs"] - before["fsyncs"] == 1
    assert after["bytes"] - before["bytes"] >= 400
    assert after["mean_batch"] > 0


def test_concurrent_producers_share_fsyncs(make_journal: Any) -> None:
    """16 threads appending and syncing need fewer fsyncs than records (group commit)."""
    journal = make_journal(segment_bytes=1 * MIB)
    threads_n, per_thread = 16, 150
    start = threading.Barrier(threads_n)
    acked: list[list[int]] = [[] for _ in range(threads_n)]
    errors: list[BaseException] = []

    def produce(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                seq = journal.append(b"%d:%d" % (t, i))
                journal.sync(seq)
                assert journal.durable_seq >= seq
                acked[t].append(seq)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    before = journal.stats()
    workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    after = journal.stats()
    records = after["records"] - before["records"]
    fsyncs = after["fsyncs"] - before["fsyncs"]
    assert records == threads_n * per_thread
    assert fsyncs < records, after
    all_seqs = sorted(s for seqs in acked for s in seqs)
    assert all_seqs == list(range(1, threads_n * per_thread + 1))
    by_seq = dict(replayed(journal))
    for t, seqs in enumerate(acked):
        assert [by_seq[s] for s in seqs] == [b"%d:%d" % (t, i) for i in range(per_thread)]


@pytest.mark.parametrize("durability", ["always", "interval", "never"])
def test_every_waiter_returns_once_its_record_is_flushed_whoever_leads(
    make_journal: Any, durability: str
) -> None:
    """Threads sleep on the flush that holds their record, and one of those a flush did not
    take is woken to lead the next: 48 threads calling sync(seq), one calling sync() on
    everything, one appending records big enough to be written out by a non-leader, and an
    event loop awaiting sync_async, over 4 MiB segments (rolls wake everyone). Each returns
    only with its record at the level the durability promises, and none is left asleep."""
    journal = make_journal(segment_bytes=4 * MIB, durability=durability)
    level = "durable_seq" if durability == "always" else "written_seq"
    threads_n, per_thread = 48, 40
    start = threading.Barrier(threads_n + 3)
    acked: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def check(seq: int) -> None:
        assert getattr(journal, level) >= seq, (level, getattr(journal, level), seq)

    def produce(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                payload = payload_for(t * 1000 + i, 40 + (t * 7 + i) % 300)
                seq = journal.append(payload)
                journal.sync(seq)
                check(seq)
                acked[seq] = payload
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    def sync_everything() -> None:
        try:
            start.wait()
            for i in range(per_thread):
                payload = payload_for(900_000 + i)
                seq = journal.append(payload)
                acked[seq] = payload
                journal.sync()
                check(seq)
        except BaseException as error:
            errors.append(error)

    def append_big() -> None:
        try:
            start.wait()
            for i in range(12):
                payload = payload_for(800_000 + i, MIB)
                acked[journal.append(payload)] = payload
            journal.sync()
        except BaseException as error:
            errors.append(error)

    def await_async() -> None:
        async def main() -> None:
            for i in range(per_thread):
                payload = payload_for(700_000 + i, 64)
                seq = journal.append(payload)
                await journal.sync_async(seq)
                check(seq)
                acked[seq] = payload

        try:
            start.wait()
            asyncio.run(main())
        except BaseException as error:
            errors.append(error)

    workers = [threading.Thread(target=produce, args=(t,), daemon=True) for t in range(threads_n)]
    workers += [threading.Thread(target=f, daemon=True)
                for f in (sync_everything, append_big, await_async)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.name for w in workers if w.is_alive()] == [], "left waiting"
    assert errors == []
    expected = sorted(acked.items())
    assert [s for s, _ in expected] == list(range(1, len(expected) + 1))
    assert len(journal.segments()) > 2
    journal.sync()
    assert replayed(journal) == expected


def test_concurrent_producers_across_segment_rolls_keep_every_record(
    make_journal: Any, journal_dir: Path
) -> None:
    """8 threads appending large records roll 64 KiB segments under contention; nothing is lost."""
    journal = make_journal(segment_bytes=64 * KIB)
    threads_n, per_thread = 8, 60
    start = threading.Barrier(threads_n)
    acked: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def produce(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                if i % 4 == 3:
                    batch = [payload_for(t * 1000 + i, 700 + k) for k in range(3)]
                    last = journal.append_many(batch)
                    journal.sync(last)
                    acked.update(zip(range(last - 2, last + 1), batch, strict=True))
                else:
                    p = payload_for(t * 1000 + i, 1000 + 97 * i)
                    seq = journal.append(p)
                    if i % 2:
                        journal.sync(seq)
                    acked[seq] = p
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    journal.sync()
    expected = sorted(acked.items())
    assert [s for s, _ in expected] == list(range(1, len(expected) + 1))
    assert len(journal.segments()) > 5
    assert replayed(journal) == expected
    journal.close()
    assert replayed(make_journal(segment_bytes=64 * KIB)) == expected


def test_release_before_from_another_thread_while_producers_append(make_journal: Any) -> None:
    """Raising the floor while other threads append and roll segments keeps the live records."""
    journal = make_journal(segment_bytes=64 * KIB)
    done = threading.Event()
    errors: list[BaseException] = []
    appended: dict[int, bytes] = {}

    def produce(t: int) -> None:
        try:
            for i in range(150):
                p = payload_for(t * 1000 + i, 1500)
                appended[journal.append(p)] = p
                journal.sync()
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    def release() -> None:
        try:
            while True:
                finished = done.is_set()  # one more release after the producers finished
                durable = journal.durable_seq
                if durable > 20:
                    journal.release_before(durable - 20)
                if finished:
                    return
                time.sleep(0.001)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    producers = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    releaser = threading.Thread(target=release)
    for thread in [*producers, releaser]:
        thread.start()
    for thread in producers:
        thread.join()
    done.set()
    releaser.join()
    assert errors == []
    floor = journal.floor
    assert floor == len(appended) - 20
    expected = [(s, appended[s]) for s in range(floor, len(appended) + 1)]
    assert replayed(journal) == expected
    journal.close()
    reopened = make_journal(segment_bytes=64 * KIB)
    assert reopened.floor == floor
    assert replayed(reopened) == expected


def test_sync_async_resolves_every_future_after_its_seq_is_durable(make_journal: Any) -> None:
    """200 coroutines each await sync_async(seq); each wakes with its seq durable."""
    journal = make_journal(segment_bytes=1 * MIB)

    async def producer(i: int) -> int:
        seq = journal.append(payload_for(i))
        future = journal.sync_async(seq)
        assert isinstance(future, asyncio.Future)
        await future
        assert journal.durable_seq >= seq
        return seq

    async def main() -> list[int]:
        return list(await asyncio.gather(*(producer(i) for i in range(200))))

    seqs = asyncio.run(main())
    assert sorted(seqs) == list(range(1, 201))
    assert journal.durable_seq == 200
    assert len(replayed(journal)) == 200


def test_sync_async_without_a_seq_covers_everything_appended(make_journal: Any) -> None:
    """sync_async() with no seq resolves once every earlier append is durable."""
    journal = make_journal(segment_bytes=1 * MIB)

    async def main() -> None:
        journal.append(b"a")
        journal.append_many([b"b", b"c"])
        await journal.sync_async()
        assert journal.durable_seq == 3
        await journal.sync_async(2)  # already durable: resolves too

    asyncio.run(main())


# --- lifecycle ---------------------------------------------------------------------------------


def test_context_manager_closes_the_journal(journal_dir: Path) -> None:
    """Leaving the with-block closes the journal, flushing its records."""
    with Journal(journal_dir, segment_bytes=64 * KIB) as journal:
        assert not journal.closed
        journal.append(b"inside")
    assert journal.closed
    with Journal(journal_dir, segment_bytes=64 * KIB) as again:
        assert replayed(again) == [(1, b"inside")]


def test_context_manager_closes_on_an_exception(journal_dir: Path) -> None:
    """An exception inside the with-block still closes (and unlocks) the journal."""
    with (
        pytest.raises(RuntimeError, match="boom"),
        Journal(journal_dir, segment_bytes=64 * KIB) as journal,
    ):
        journal.sync(journal.append(b"kept"))
        raise RuntimeError("boom")
    assert journal.closed
    with Journal(journal_dir, segment_bytes=64 * KIB) as again:
        assert replayed(again) == [(1, b"kept")]


def test_close_twice_is_harmless(make_journal: Any) -> None:
    """A second close() does nothing."""
    journal = make_journal(segment_bytes=64 * KIB)
    journal.close()
    journal.close()
    assert journal.closed


@pytest.mark.parametrize(
    "use",
    [
        lambda j: j.append(b"x"),
        lambda j: j.append_many([b"x"]),
        lambda j: j.sync(),
        lambda j: j.sync(1),
        lambda j: list(j.replay()),
        lambda j: j.release_before(1),
        lambda j: j.copy_forward([1]),
    ],
    ids=["append", "append_many", "sync", "sync-seq", "replay", "release_before", "copy_forward"],
)
def test_using_a_closed_journal_raises_value_error(make_journal: Any, use: Any) -> None:
    """Every operation on a closed journal raises ValueError saying it is closed."""
    journal = make_journal(segment_bytes=64 * KIB)
    journal.sync(journal.append(b"x"))
    journal.close()
    with pytest.raises(ValueError, match=r"(?i)closed"):
        use(journal)


def test_sync_async_on_a_closed_journal_raises_value_error(make_journal: Any) -> None:
    """sync_async on a closed journal raises ValueError at once (no future is made)."""
    journal = make_journal(segment_bytes=64 * KIB)
    journal.close()

    async def main() -> None:
        with pytest.raises(ValueError, match=r"(?i)closed"):
            await journal.sync_async()

    asyncio.run(main())


def test_second_journal_on_the_same_directory_raises_journal_locked(make_journal: Any) -> None:
    """Two journals in one process cannot share a directory; the first keeps working."""
    journal = make_journal(segment_bytes=64 * KIB)
    with pytest.raises(JournalLocked):
        make_journal(segment_bytes=64 * KIB)
    assert issubclass(JournalLocked, JournalError)
    journal.sync(journal.append(b"still mine"))
    journal.close()
    reopened = make_journal(segment_bytes=64 * KIB)  # the lock went with the close
    assert replayed(reopened) == [(1, b"still mine")]


_HOLD_LOCK = textwrap.dedent(
    """
    import sys
    from pmq._journal import Journal
    with Journal(sys.argv[1], segment_bytes=64 * 1024) as journal:
        journal.sync(journal.append(b"from the child"))
        print("locked", flush=True)
        sys.stdin.read()  # hold the lock until the parent closes our stdin
    """
)

_TRY_LOCK = textwrap.dedent(
    """
    import sys
    from pmq._journal import Journal
    from pmq.errors import JournalLocked
    try:
        Journal(sys.argv[1], segment_bytes=64 * 1024).close()
    except JournalLocked as error:
        print("JournalLocked:", error)
        sys.exit(0)
    print("opened")
    sys.exit(1)
    """
)


def test_journal_held_by_another_process_raises_journal_locked(journal_dir: Path) -> None:
    """A journal open in another process refuses a second opener here until it closes."""
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(journal_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None and child.stdin is not None
        try:
            assert child.stdout.readline().strip() == "locked"
            with pytest.raises(JournalLocked):
                Journal(journal_dir, segment_bytes=64 * KIB)
        finally:
            child.stdin.close()
            assert child.wait(timeout=120) == 0
    with Journal(journal_dir, segment_bytes=64 * KIB) as journal:
        assert replayed(journal) == [(1, b"from the child")]


def test_journal_held_here_raises_journal_locked_in_another_process(make_journal: Any) -> None:
    """Another process cannot open a journal this process holds."""
    journal = make_journal(segment_bytes=64 * KIB)
    result = subprocess.run(
        [sys.executable, "-c", _TRY_LOCK, journal.directory],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("JournalLocked")
