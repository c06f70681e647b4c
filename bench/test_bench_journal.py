"""pytest-benchmark suite of the journal: payload size x commit batch, as etcd's wal_bench_test.

Run it with::

    .venv/bin/python -m pytest bench/test_bench_journal.py --benchmark-only
    .venv/bin/python -m pytest bench/test_bench_journal.py --benchmark-only \\
        --benchmark-min-rounds 3 --benchmark-save journal      # keep the JSON to compare later

Owns: the matrix {100 B, 1 KiB, 16 KiB} x {1, 10, 100, 1000 records per commit}, for the journal
(durability "always", every commit is one ``sync`` = one fsync) and for the plain baseline (one
``os.write`` of the whole batch + ``os.fdatasync`` on a fresh, growing file). Must not: run in the
default ``make test`` (which collects tests/ only).

Invariants:
- ``benchmark.pedantic`` with a setup function: every round gets a fresh directory and a freshly
  opened journal (or a fresh file), so no round inherits a grown segment from the one before. The
  setup (open, zero-filled segment preparation, closing the previous round) is not timed.
- One round makes ``commits`` commits of ``batch`` records: up to 200, fewer for big batches so
  that a round writes at most ``ROUND_BYTES`` (16 MiB). ``extra_info`` records the counts, the
  derived records/s and MB/s (from the mean round time) and the journal's stats of a round.
- Tests of one (size, batch) share a group, so the table puts the journal next to the baseline.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import _benchutil as bu

SIZES = (100, 1024, 16 * 1024)
BATCHES = (1, 10, 100, 1000)
ROUND_BYTES = 16 << 20
MAX_COMMITS_PER_ROUND = 200
APIS = ("append", "append_many")

CASES = [
    pytest.param(size, batch, api, id=f"{api}-{_size}-batch{batch}")
    for size, _size in zip(SIZES, ("100B", "1KiB", "16KiB"), strict=True)
    for batch in BATCHES
    for api in APIS
    if not (batch == 1 and api == "append_many")  # one record: the same call as append
]
BASELINE_CASES = [
    pytest.param(size, batch, id=f"{_size}-batch{batch}")
    for size, _size in zip(SIZES, ("100B", "1KiB", "16KiB"), strict=True)
    for batch in BATCHES
]


def commits_per_round(size: int, batch: int) -> int:
    """How many commits one round makes: up to 200, at most ``ROUND_BYTES`` of payload."""
    return max(1, min(MAX_COMMITS_PER_ROUND, ROUND_BYTES // (size * batch)))


def _record_throughput(benchmark: Any, records: int, payload_bytes: int) -> None:
    benchmark.extra_info["records_per_round"] = records
    benchmark.extra_info["payload_bytes_per_round"] = payload_bytes
    stats = getattr(benchmark, "stats", None)
    mean = getattr(getattr(stats, "stats", None), "mean", None)
    if mean:
        benchmark.extra_info["records_per_s"] = records / mean
        benchmark.extra_info["payload_mb_per_s"] = payload_bytes / mean / 1e6


class _Rounds:
    """Hands each round a fresh directory; closes and deletes the previous one first."""

    def __init__(self, base: Path, name: str) -> None:
        self.base = base
        self.name = name
        self.count = 0
        self.journal: Any = None
        self.fd: int | None = None
        self.directory: Path | None = None

    def fresh_directory(self) -> Path:
        self.finish()
        self.count += 1
        self.directory = self.base / f"{self.name}-{self.count}"
        self.directory.mkdir()
        return self.directory

    def finish(self) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.directory is not None:
            bu.remove_tree(self.directory)
            self.directory = None


@pytest.mark.parametrize(("size", "batch", "api"), CASES)
def test_journal_commit(
    benchmark: Any, bench_base: Path, rounds: int, size: int, batch: int, api: str
) -> None:
    """Journal, durability "always": ``commits`` x (``batch`` records, then one sync)."""
    from pmq._journal import Journal

    benchmark.group = f"{size} B x batch {batch}"
    commits = commits_per_round(size, batch)
    payloads = [os.urandom(size)] * batch
    holder = _Rounds(bench_base, f"journal-{api}-{size}-{batch}")

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        holder.journal = Journal(holder.fresh_directory(), durability="always")
        return (holder.journal,), {}

    if api == "append":

        def run(journal: Any) -> None:
            append, sync = journal.append, journal.sync
            for _ in range(commits):
                for payload in payloads:
                    seq = append(payload)
                sync(seq)

    else:

        def run(journal: Any) -> None:
            append_many, sync = journal.append_many, journal.sync
            for _ in range(commits):
                sync(append_many(payloads))

    try:
        benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
        stats = holder.journal.stats() if holder.journal is not None else {}
    finally:
        holder.finish()
    benchmark.extra_info.update(api=api, payload=size, batch=batch, commits=commits)
    benchmark.extra_info["last_round_stats"] = stats
    _record_throughput(benchmark, commits * batch, commits * batch * size)


@pytest.mark.parametrize(("size", "batch"), BASELINE_CASES)
def test_plain_write_fdatasync(
    benchmark: Any, bench_base: Path, rounds: int, size: int, batch: int
) -> None:
    """Baseline: ``commits`` x (one os.write of ``batch`` records + os.fdatasync), growing file."""
    benchmark.group = f"{size} B x batch {batch}"
    commits = commits_per_round(size, batch)
    chunk = os.urandom(size) * batch
    holder = _Rounds(bench_base, f"plain-{size}-{batch}")

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        directory = holder.fresh_directory()
        holder.fd = os.open(directory / "plain.dat", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        return (holder.fd,), {}

    def run(fd: int) -> None:
        write, fdatasync = os.write, os.fdatasync
        for _ in range(commits):
            if write(fd, chunk) != len(chunk):
                raise OSError("short write")
            fdatasync(fd)

    runner: Callable[[int], None] = run
    try:
        benchmark.pedantic(runner, setup=setup, rounds=rounds, iterations=1)
    finally:
        holder.finish()
    benchmark.extra_info.update(
        api="os.write+fdatasync", payload=size, batch=batch, commits=commits
    )
    _record_throughput(benchmark, commits * batch, commits * batch * size)
