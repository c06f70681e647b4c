"""The measurements behind bench/report.py: one function per case of the speed requirements.

Owns: how each case is timed (what runs inside the timed window, what is only setup) and the
``Result`` row it produces. Must not: print, judge against targets or save anything (report.py
does that), or open a journal with settings other than its defaults plus the case's durability.

Invariants:
- Every payload is ``PAYLOAD_BYTES`` (100) bytes; each case uses a fresh directory under ``work``
  and closes its journal before returning, also when it fails.
- The timed window of a journal case starts after the journal is open (``open_s`` is recorded
  separately) and ends before ``close()`` (``close_s`` too); the "never" cases also give MB/s
  including the close, whose final fsync makes the bytes durable.
- Counters such as fsyncs/s and mean batch are deltas of ``journal.stats()`` over the window.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _benchutil as bu

PAYLOAD_BYTES = 100
THREAD_PRODUCERS = 64
ASYNC_PRODUCERS = 1000
MANY_BATCH = 1000
NEVER_SYNC_EVERY = 1000
RAW_CHUNK_BYTES = 1 << 20
RAW_REPEATS = 2
MB = 1_000_000  # MB/s in this report are 10^6 bytes per second


@dataclass
class Result:
    """One row of the report: what was measured, and how it compares with its target."""

    name: str
    label: str
    records: int = 0
    seconds: float = 0.0
    records_per_s: float | None = None
    ratio: float | None = None
    target: str = ""
    target_kind: str = "none"  # "ratio", "records_per_s" or "none"
    target_value: float | None = None
    met: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# helpers


def import_journal() -> Any:
    from pmq._journal import Journal

    return Journal



def _stat(stats: dict[str, float], *names: str) -> float | None:
    """Look a counter up in ``journal.stats()``, spelt with spaces or underscores."""
    normalised = {key.lower().replace(" ", "_").replace("-", "_"): v for key, v in stats.items()}
    for name in names:
        if name in normalised:
            return float(normalised[name])
    return None


def _stats_delta(
    before: dict[str, float], after: dict[str, float], seconds: float
) -> dict[str, Any]:
    """fsyncs/s, flushes/s and mean batch over a window, from two ``stats()`` snapshots."""
    out: dict[str, Any] = {}
    fsyncs = _delta(before, after, "fsyncs")
    records = _delta(before, after, "records")
    flushes = _delta(before, after, "flushes")
    written = _delta(before, after, "bytes", "bytes_written")
    if fsyncs is not None:
        out["fsyncs"] = fsyncs
        out["fsyncs_per_s"] = fsyncs / seconds if seconds > 0 else None
    if flushes is not None:
        out["flushes_per_s"] = flushes / seconds if seconds > 0 else None
    if records is not None and fsyncs:
        out["records_per_fsync"] = records / fsyncs
    if written is not None:
        out["journal_bytes"] = written
    reported = _stat(after, "mean_batch", "batch_mean", "avg_batch")
    if reported is not None:
        out["stats_mean_batch"] = reported
    out["stats_after"] = after
    return out


def _delta(before: dict[str, float], after: dict[str, float], *names: str) -> float | None:
    a, b = _stat(after, *names), _stat(before, *names)
    if a is None or b is None:
        return None
    return a - b


def _fresh(work: Path, name: str) -> Path:
    path = work / name
    bu.remove_tree(path)
    path.mkdir(parents=True)
    return path


def _open(journal_cls: Any, directory: Path, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    journal = journal_cls(directory, **kwargs)
    return journal, time.perf_counter() - start


def _close(journal: Any) -> float:
    start = time.perf_counter()
    journal.close()
    return time.perf_counter() - start


def settle() -> None:
    """Push every dirty page out so the next case starts from a quiet disk."""
    os.sync()
    time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# baselines


def case_plain(work: Path, seconds: float, label: str) -> Result:
    """Single thread: os.write(100 B) + os.fdatasync, appending to a fresh (growing) file."""
    path = work / f"plain-{time.monotonic_ns()}.dat"
    payload = os.urandom(PAYLOAD_BYTES)
    latencies: list[int] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        clock = time.perf_counter_ns
        start = clock()
        deadline = start + int(seconds * 1e9)
        now = start
        while now < deadline:
            before = now
            os.write(fd, payload)
            os.fdatasync(fd)
            now = clock()
            latencies.append(now - before)
        elapsed = (now - start) / 1e9
    finally:
        os.close(fd)
        os.unlink(path)
    n = len(latencies)
    return Result(
        name="plain",
        label=label,
        records=n,
        seconds=elapsed,
        records_per_s=n / elapsed,
        extra=bu.latency_summary(latencies),
    )


def _raw_once(path: Path, chunk: bytes, mib: int) -> tuple[float, float]:
    """Write ``mib`` chunks to a fresh file, fdatasync; return (total s, fdatasync s)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        start = time.perf_counter()
        for _ in range(mib):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        written = time.perf_counter()
        os.fdatasync(fd)
        end = time.perf_counter()
    finally:
        os.close(fd)
        os.unlink(path)
    return end - start, end - written


def case_raw(work: Path, mib: int, when: str) -> Result:
    """Raw sequential write bandwidth: ``mib`` x 1 MiB os.write to a fresh file + one fdatasync.

    Done twice back to back and the faster run counts: on a VM the first large write after a
    pause can be several times slower than the next one (the host's cache waking up), and the
    journal cases are compared with what the disk can do, not with its warm-up.
    """
    chunk = os.urandom(RAW_CHUNK_BYTES)
    total = mib * RAW_CHUNK_BYTES
    runs = [_raw_once(work / f"raw-{i}.dat", chunk, mib) for i in range(RAW_REPEATS)]
    best_s, best_sync_s = min(runs)
    return Result(
        name="raw",
        label=f"raw write {mib} x 1 MiB + fdatasync ({when})",
        seconds=best_s,
        target="(reference)",
        extra={
            "bytes": total,
            "mb_per_s": total / best_s / MB,
            "runs_mb_per_s": [total / t / MB for t, _ in runs],
            "fdatasync_s": best_sync_s,
        },
    )


# ---------------------------------------------------------------------------------------------
# durability "always"


def case_one(journal_cls: Any, work: Path, seconds: float) -> Result:
    """One producer: append(100 B) then sync(seq), one at a time."""
    journal, open_s = _open(journal_cls, _fresh(work, "one"), durability="always")
    payload = os.urandom(PAYLOAD_BYTES)
    latencies: list[int] = []
    try:
        append, sync = journal.append, journal.sync
        before_stats = journal.stats()
        clock = time.perf_counter_ns
        start = clock()
        deadline = start + int(seconds * 1e9)
        now = start
        while now < deadline:
            before = now
            sync(append(payload))
            now = clock()
            latencies.append(now - before)
        elapsed = (now - start) / 1e9
        after_stats = journal.stats()
        durable_ok = journal.durable_seq >= len(latencies)
    finally:
        close_s = _close(journal)
    n = len(latencies)
    extra = bu.latency_summary(latencies)
    extra.update(_stats_delta(before_stats, after_stats, elapsed))
    extra.update(open_s=open_s, close_s=close_s, durable_seq_covers_all=durable_ok)
    return Result(
        name="one",
        label="always, 1 producer (append + sync each)",
        records=n,
        seconds=elapsed,
        records_per_s=n / elapsed,
        target=">= 0.9x plain",
        target_kind="ratio",
        target_value=0.9,
        extra=extra,
    )


def case_threads(journal_cls: Any, work: Path, seconds: float) -> Result:
    """64 threads, each looping append(100 B) then sync(seq)."""
    journal, open_s = _open(journal_cls, _fresh(work, "threads"), durability="always")
    payload = os.urandom(PAYLOAD_BYTES)
    stop = threading.Event()
    barrier = threading.Barrier(THREAD_PRODUCERS + 1)
    per_thread: list[list[int]] = [[] for _ in range(THREAD_PRODUCERS)]
    errors: list[BaseException] = []

    def producer(latencies: list[int]) -> None:
        append, sync, clock = journal.append, journal.sync, time.perf_counter_ns
        barrier.wait()
        try:
            while not stop.is_set():
                before = clock()
                sync(append(payload))
                latencies.append(clock() - before)
        except BaseException as exc:  # reported in the row, the other threads go on
            errors.append(exc)

    threads = [threading.Thread(target=producer, args=(lat,), daemon=True) for lat in per_thread]
    try:
        for thread in threads:
            thread.start()
        before_stats = journal.stats()
        barrier.wait()
        start = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        after_stats = journal.stats()
    finally:
        stop.set()
        close_s = _close(journal)
    if errors:
        raise errors[0]
    latencies = [x for lat in per_thread for x in lat]
    n = len(latencies)
    extra = bu.latency_summary(latencies)
    extra.update(_stats_delta(before_stats, after_stats, elapsed))
    extra.update(open_s=open_s, close_s=close_s, producers=THREAD_PRODUCERS)
    return Result(
        name="threads",
        label=f"always, {THREAD_PRODUCERS} producer threads",
        records=n,
        seconds=elapsed,
        records_per_s=n / elapsed,
        target=">= 5x plain",
        target_kind="ratio",
        target_value=5.0,
        extra=extra,
    )


def case_asyncio(journal_cls: Any, work: Path, seconds: float) -> Result:
    """1,000 asyncio tasks, each looping append(100 B) then ``await sync_async(seq)``."""
    journal, open_s = _open(journal_cls, _fresh(work, "asyncio"), durability="always")
    payload = os.urandom(PAYLOAD_BYTES)
    latencies: list[int] = []

    async def run() -> tuple[float, dict[str, float], dict[str, float]]:
        stopping = False
        go = asyncio.Event()
        append, sync_async, clock = journal.append, journal.sync_async, time.perf_counter_ns

        async def producer() -> None:
            await go.wait()
            while not stopping:
                before = clock()
                await sync_async(append(payload))
                latencies.append(clock() - before)

        tasks = [asyncio.create_task(producer()) for _ in range(ASYNC_PRODUCERS)]
        await asyncio.sleep(0)  # every task is now waiting on `go`
        before_stats = journal.stats()
        start = time.perf_counter()
        go.set()
        await asyncio.sleep(seconds)
        stopping = True
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        return elapsed, before_stats, journal.stats()

    try:
        elapsed, before_stats, after_stats = asyncio.run(run())
    finally:
        close_s = _close(journal)
    n = len(latencies)
    extra = bu.latency_summary(latencies)
    extra.update(_stats_delta(before_stats, after_stats, elapsed))
    extra.update(open_s=open_s, close_s=close_s, producers=ASYNC_PRODUCERS)
    return Result(
        name="asyncio",
        label=f"always, {ASYNC_PRODUCERS:,} asyncio producers (sync_async)",
        records=n,
        seconds=elapsed,
        records_per_s=n / elapsed,
        target=">= 30x plain",
        target_kind="ratio",
        target_value=30.0,
        extra=extra,
    )


def case_many(journal_cls: Any, work: Path, seconds: float) -> Result:
    """One thread: append_many(1,000 x 100 B) then sync(seq), one batch at a time."""
    journal, open_s = _open(journal_cls, _fresh(work, "many"), durability="always")
    batch = [os.urandom(PAYLOAD_BYTES)] * MANY_BATCH
    latencies: list[int] = []
    try:
        append_many, sync = journal.append_many, journal.sync
        before_stats = journal.stats()
        clock = time.perf_counter_ns
        start = clock()
        deadline = start + int(seconds * 1e9)
        now = start
        while now < deadline:
            before = now
            sync(append_many(batch))
            now = clock()
            latencies.append(now - before)
        elapsed = (now - start) / 1e9
        after_stats = journal.stats()
    finally:
        close_s = _close(journal)
    n = len(latencies) * MANY_BATCH
    extra = bu.latency_summary(latencies, "commit_")
    extra.update(_stats_delta(before_stats, after_stats, elapsed))
    extra.update(open_s=open_s, close_s=close_s, batch=MANY_BATCH)
    return Result(
        name="many",
        label=f"always, append_many x {MANY_BATCH:,} + sync",
        records=n,
        seconds=elapsed,
        records_per_s=n / elapsed,
        target=">= 150x plain",
        target_kind="ratio",
        target_value=150.0,
        extra=extra,
    )


# ---------------------------------------------------------------------------------------------
# durability "never"


def _never_bandwidth(extra: dict[str, Any], records: int, loop_s: float, close_s: float) -> None:
    payload_bytes = records * PAYLOAD_BYTES
    journal_bytes = extra.get("journal_bytes")
    extra["payload_mb_per_s"] = payload_bytes / loop_s / MB
    extra["payload_mb_per_s_incl_close"] = payload_bytes / (loop_s + close_s) / MB
    if journal_bytes:
        extra["journal_mb_per_s"] = journal_bytes / loop_s / MB
        extra["journal_mb_per_s_incl_close"] = journal_bytes / (loop_s + close_s) / MB


def case_never(journal_cls: Any, work: Path, seconds: float) -> Result:
    """durability "never": append(100 B) per record, sync() (a write, no fsync) every 1,000."""
    journal, open_s = _open(journal_cls, _fresh(work, "never"), durability="never")
    payload = os.urandom(PAYLOAD_BYTES)
    rounds = 0
    try:
        append, sync = journal.append, journal.sync
        before_stats = journal.stats()
        clock = time.perf_counter
        start = clock()
        deadline = start + seconds
        inner = range(NEVER_SYNC_EVERY)
        now = start
        while now < deadline:
            for _ in inner:
                append(payload)
            sync()
            rounds += 1
            now = clock()
        elapsed = now - start
        after_stats = journal.stats()
    finally:
        close_s = _close(journal)
    n = rounds * NEVER_SYNC_EVERY
    extra = _stats_delta(before_stats, after_stats, elapsed)
    extra.update(open_s=open_s, close_s=close_s, sync_every=NEVER_SYNC_EVERY)
    _never_bandwidth(extra, n, elapsed, close_s)
    return Result(
        name="never",
        label=f"never, append (sync() every {NEVER_SYNC_EVERY:,})",
        records=n,
        seconds=elapsed,
        records_per_s=n / elapsed,
        target=">= 1.5 M rec/s",
        target_kind="records_per_s",
        target_value=1.5e6,
        extra=extra,
    )


def case_never_many(journal_cls: Any, work: Path, seconds: float) -> Result:
    """durability "never": append_many(1,000 x 100 B) then sync(), repeatedly."""
    journal, open_s = _open(journal_cls, _fresh(work, "never_many"), durability="never")
    batch = [os.urandom(PAYLOAD_BYTES)] * MANY_BATCH
    rounds = 0
    try:
        append_many, sync = journal.append_many, journal.sync
        before_stats = journal.stats()
        clock = time.perf_counter
        start = clock()
        deadline = start + seconds
        now = start
        while now < deadline:
            sync(append_many(batch))
            rounds += 1
            now = clock()
        elapsed = now - start
        after_stats = journal.stats()
    finally:
        close_s = _close(journal)
    n = rounds * MANY_BATCH
    extra = _stats_delta(before_stats, after_stats, elapsed)
    extra.update(open_s=open_s, close_s=close_s, batch=MANY_BATCH)
    _never_bandwidth(extra, n, elapsed, close_s)
    return Result(
        name="never_many",
        label=f"never, append_many x {MANY_BATCH:,} + sync",
        records=n,
        seconds=elapsed,
        records_per_s=n / elapsed,
        target=">= 1.5 M rec/s",
        target_kind="records_per_s",
        target_value=1.5e6,
        extra=extra,
    )


# ---------------------------------------------------------------------------------------------
# reopen


def _drop_page_cache(directory: Path) -> bool:
    """Ask the kernel to forget the (clean, fsynced) pages of every file in ``directory``."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for entry in os.scandir(directory):
        if not entry.is_file():
            continue
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def case_reopen(journal_cls: Any, work: Path, gib: float, write_cap_s: float) -> Result:
    """Write ~``gib`` GiB of 100 B records (append_many, "never"), close, then time Journal(dir)."""
    directory = _fresh(work, "reopen")
    target_bytes = int(gib * (1 << 30))
    batch = [os.urandom(PAYLOAD_BYTES)] * MANY_BATCH
    journal, _ = _open(journal_cls, directory, durability="never")
    rounds = 0
    try:
        start = time.perf_counter()
        deadline = start + write_cap_s
        while rounds * MANY_BATCH * PAYLOAD_BYTES < target_bytes:
            journal.sync(journal.append_many(batch))
            rounds += 1
            if time.perf_counter() > deadline:
                break
        last_seq = journal.next_seq - 1
        write_s = time.perf_counter() - start
        log_bytes = _stat(journal.stats(), "bytes")
    finally:
        close_s = _close(journal)
    records = rounds * MANY_BATCH
    segment_bytes = sum(e.stat().st_size for e in os.scandir(directory) if e.name.endswith(".seg"))
    # MB/s of the log actually written (frames); the files also hold the unused, preallocated
    # rest of the active segment, which open may not need to read.
    data_bytes = int(log_bytes) if log_bytes else records * PAYLOAD_BYTES
    os.sync()

    timings: dict[str, Any] = {}
    for mode in ("warm", "cold"):
        if mode == "cold" and not _drop_page_cache(directory):
            continue
        reopened, open_s = _open(journal_cls, directory)
        try:
            recovered_next = reopened.next_seq
            segments = len(reopened.segments())
        finally:
            reclose_s = _close(reopened)
        timings[mode] = {
            "open_s": open_s,
            "mb_per_s": data_bytes / open_s / MB,
            "file_mb_per_s": segment_bytes / open_s / MB,
            "next_seq_ok": recovered_next == last_seq + 1,
            "segments": segments,
            "close_s": reclose_s,
        }
    bu.remove_tree(directory)
    headline = timings.get("cold", timings["warm"])
    extra: dict[str, Any] = {
        "segment_file_bytes": segment_bytes,
        "log_bytes": data_bytes,
        "records": records,
        "write_s": write_s,
        "write_records_per_s": records / write_s,
        "write_close_s": close_s,
        "reached_target_size": rounds * MANY_BATCH * PAYLOAD_BYTES >= target_bytes,
        **{f"{mode}_{k}": v for mode, t in timings.items() for k, v in t.items()},
    }
    return Result(
        name="reopen",
        label=f"reopen a {data_bytes / (1 << 30):.2f} GiB journal (Journal(dir))",
        records=records,
        seconds=headline["open_s"],
        records_per_s=records / headline["open_s"],
        target="report MB/s",
        extra=extra,
    )
