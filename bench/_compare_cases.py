"""The measurements behind bench/compare_local.py: one function per case, each run in a child.

Owns: how each case stores the call ``accounts.credit(12345, amount=10, memo="x" * 40)`` durably
(an fsync covers every call before it is acknowledged), what is inside the timed window, and the
``CaseResult`` it produces. Must not: print, judge against targets or save anything (the parent,
compare_local.py, does that), or relax any library's durability below "fsync before the call is
acknowledged".

Invariants:
- Each case gets a fresh directory (``work``) in a fresh interpreter (compare_local.py runs every
  case as a child process): no thread, cache or open file survives from one case to the next.
- The timed window starts after the store is open and warmed up by one untimed call (one commit),
  and ends when the last producer has returned; closing/stopping is timed separately
  (``close_s``). The end-to-end case is the exception: its window starts at its first call and
  ends when ``cage.drain()`` returns, so it includes the execution of every call.
- Every case checks what it stored (row counts, queue sizes, executed counts) and says so in
  ``extra``; a wrong count is an error, not a footnote.
- The pmq cases use only the public API of DESIGN.md §1 (``pmq.Cage``, ``expose``, ``start``,
  ``execute``/``aexecute``, ``transaction``, ``drain``, ``stop``, ``stats``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _benchutil as bu

QUEUE = "loopback_queue"
ACCOUNT = 12345
AMOUNT = 10
MEMO = "x" * 40
THREAD_PRODUCERS = 64
ASYNC_PRODUCERS = 1000
BATCH_CALLS = 1000  # rows per SQLite COMMIT and calls per pmq transaction
CAGE_NAME = "bench"

SQL_CREATE = (
    "CREATE TABLE calls (id INTEGER PRIMARY KEY, queue TEXT NOT NULL, module TEXT NOT NULL, "
    "method TEXT NOT NULL, args BLOB NOT NULL, created REAL NOT NULL, status INTEGER NOT NULL)"
)
SQL_INSERT = (
    "INSERT INTO calls (queue, module, method, args, created, status) VALUES (?, ?, ?, ?, ?, 0)"
)


@dataclass
class CaseResult:
    """One row of the comparison: what was measured, and how it compares with its target."""

    name: str
    label: str
    calls: int = 0
    seconds: float = 0.0
    calls_per_s: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    durability: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    skipped: bool = False


# ---------------------------------------------------------------------------------------------
# helpers



def _pack_args() -> bytes:
    import msgpack

    return bytes(msgpack.packb([[ACCOUNT], {"amount": AMOUNT, "memo": MEMO}]))


def _sqlite_open(path: Path) -> tuple[sqlite3.Connection, dict[str, Any]]:
    """A WAL database with synchronous=FULL (every COMMIT fsyncs the WAL), settings verified."""
    # isolation_level=None: the module issues no implicit BEGIN; the loops below say BEGIN/COMMIT
    conn = sqlite3.connect(path, isolation_level=None)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    conn.execute("PRAGMA synchronous=FULL")
    sync = conn.execute("PRAGMA synchronous").fetchone()[0]
    if mode != "wal" or sync != 2:
        raise RuntimeError(f"SQLite refused WAL/FULL: journal_mode={mode}, synchronous={sync}")
    conn.execute(SQL_CREATE)
    return conn, {"journal_mode": mode, "synchronous": sync, "sqlite": sqlite3.sqlite_version}


def _sqlite_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0])


# ---------------------------------------------------------------------------------------------
# SQLite and persist-queue


def case_sqlite_one(work: Path, seconds: float) -> CaseResult:
    """sqlite3, WAL + synchronous=FULL: BEGIN, one INSERT of the call, COMMIT; one thread."""
    conn, settings = _sqlite_open(work / "calls.db")
    latencies: list[int] = []
    try:
        execute = conn.execute
        execute("BEGIN")
        execute(SQL_INSERT, (QUEUE, "accounts", "credit", _pack_args(), time.time()))
        execute("COMMIT")  # warm-up, untimed
        clock = time.perf_counter_ns
        start = clock()
        deadline = start + int(seconds * 1e9)
        now = start
        while now < deadline:
            before = now
            execute("BEGIN")
            execute(SQL_INSERT, (QUEUE, "accounts", "credit", _pack_args(), time.time()))
            execute("COMMIT")
            now = clock()
            latencies.append(now - before)
        elapsed = (now - start) / 1e9
        stored = _sqlite_count(conn) - 1
    finally:
        close_start = time.perf_counter()
        conn.close()
        close_s = time.perf_counter() - close_start
    n = len(latencies)
    extra: dict[str, Any] = bu.latency_summary(latencies)
    extra.update(settings, rows_stored=stored, close_s=close_s)
    return CaseResult(
        name="sqlite_one",
        label="sqlite3 WAL, 1 INSERT per COMMIT, 1 thread",
        calls=n,
        seconds=elapsed,
        calls_per_s=n / elapsed,
        durability="journal_mode=WAL, synchronous=FULL (2): each COMMIT fsyncs the WAL",
        extra=extra,
        error=None if stored == n else f"{stored} rows stored for {n} commits",
    )


def case_sqlite_batch(work: Path, seconds: float) -> CaseResult:
    """sqlite3, WAL + synchronous=FULL: BEGIN, 1,000 INSERTs (one per call), COMMIT."""
    conn, settings = _sqlite_open(work / "calls.db")
    latencies: list[int] = []
    try:
        execute = conn.execute
        execute("BEGIN")
        execute(SQL_INSERT, (QUEUE, "accounts", "credit", _pack_args(), time.time()))
        execute("COMMIT")  # warm-up, untimed
        clock = time.perf_counter_ns
        start = clock()
        deadline = start + int(seconds * 1e9)
        now = start
        while now < deadline:
            before = now
            execute("BEGIN")
            for _ in range(BATCH_CALLS):
                execute(SQL_INSERT, (QUEUE, "accounts", "credit", _pack_args(), time.time()))
            execute("COMMIT")
            now = clock()
            latencies.append(now - before)
        elapsed = (now - start) / 1e9
        stored = _sqlite_count(conn) - 1
    finally:
        close_start = time.perf_counter()
        conn.close()
        close_s = time.perf_counter() - close_start
    n = len(latencies) * BATCH_CALLS
    extra: dict[str, Any] = bu.latency_summary(latencies, "commit_")
    extra.update(settings, rows_stored=stored, close_s=close_s, batch=BATCH_CALLS)
    return CaseResult(
        name="sqlite_batch",
        label=f"sqlite3 WAL, {BATCH_CALLS:,} INSERTs per COMMIT",
        calls=n,
        seconds=elapsed,
        calls_per_s=n / elapsed,
        durability="journal_mode=WAL, synchronous=FULL (2): each COMMIT fsyncs the WAL",
        extra=extra,
        error=None if stored == n else f"{stored} rows stored for {n} calls",
    )


def case_persist_queue(work: Path, seconds: float) -> CaseResult:
    """persist-queue SQLiteAckQueue.put of the call, one thread (one COMMIT per put)."""
    from importlib import metadata

    from persistqueue import SQLiteAckQueue
    from persistqueue.serializers import msgpack as pq_msgpack

    # auto_commit=True: put() commits its INSERT at once (SQLiteAckQueue forces it anyway);
    # multithreading=False: one connection, used by the one producing thread.
    queue = SQLiteAckQueue(
        str(work / "pq"), auto_commit=True, multithreading=False, serializer=pq_msgpack
    )
    # persist-queue opens its connections with journal_mode=WAL and leaves `synchronous` at
    # SQLite's default; it has no option for it, so set FULL on its connection and read it back.
    conn: Any = queue._putter
    conn.execute("PRAGMA synchronous=FULL")
    settings = {
        "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
        "synchronous": conn.execute("PRAGMA synchronous").fetchone()[0],
        "sqlite": sqlite3.sqlite_version,
        "persist_queue": metadata.version("persist-queue"),
        "same_connection_for_put_and_get": queue._putter is queue._getter,
    }
    if settings["journal_mode"] != "wal" or settings["synchronous"] != 2:
        raise RuntimeError(f"persist-queue's SQLite is not WAL/FULL: {settings}")
    item = {
        "queue": QUEUE,
        "module": "accounts",
        "method": "credit",
        "args": [ACCOUNT],
        "kwargs": {"amount": AMOUNT, "memo": MEMO},
    }
    latencies: list[int] = []
    try:
        put = queue.put
        put(item)  # warm-up, untimed
        clock = time.perf_counter_ns
        start = clock()
        deadline = start + int(seconds * 1e9)
        now = start
        while now < deadline:
            before = now
            put(item)
            now = clock()
            latencies.append(now - before)
        elapsed = (now - start) / 1e9
        stored = int(queue.qsize()) - 1
    finally:
        close_start = time.perf_counter()
        queue.close()
        close_s = time.perf_counter() - close_start
    n = len(latencies)
    extra: dict[str, Any] = bu.latency_summary(latencies)
    extra.update(settings, queued=stored, close_s=close_s)
    return CaseResult(
        name="pq_ack",
        label="persist-queue SQLiteAckQueue.put, 1 thread",
        calls=n,
        seconds=elapsed,
        calls_per_s=n / elapsed,
        durability=(
            "SQLiteAckQueue(path, auto_commit=True, multithreading=False, "
            "serializer=persistqueue.serializers.msgpack); its connection: journal_mode=WAL "
            "(set by persist-queue), PRAGMA synchronous=FULL (set by us, read back as 2): "
            "each put() is one COMMIT that fsyncs the WAL"
        ),
        extra=extra,
        error=None if stored == n else f"qsize {stored} after {n} puts",
    )


# ---------------------------------------------------------------------------------------------
# pmq


class Accounts:
    """The exposed module: ``credit`` does nothing but count its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def credit(self, account: int, amount: int, memo: str) -> None:
        with self._lock:
            self.calls += 1


PMQ_DURABILITY = "pmq.Cage defaults (journal durability 'always': fsync before each ack)"


def _new_cage(work: Path, accounts: Accounts) -> Any:
    import pmq

    cage = pmq.Cage(CAGE_NAME, data_dir=str(work / "cage"))
    cage.expose("accounts", accounts)
    return cage


def _jsonable(value: Any) -> Any:
    """``value`` with every mapping key made a string (``stats()`` keys queues by tuples)."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else repr(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _stats(cage: Any) -> Any:
    stats = getattr(cage, "stats", None)
    if stats is None:
        return None
    try:
        return _jsonable(stats())
    except Exception as exc:  # the figures still count; the row says stats() failed
        return f"stats() raised {exc!r}"


def _fsyncs(stats: Any) -> float | None:
    journal = stats.get("journal") if isinstance(stats, dict) else None
    value = journal.get("fsyncs") if isinstance(journal, dict) else None
    return float(value) if isinstance(value, int | float) else None


def _window_stats(before: Any, after: Any, calls: int, seconds: float) -> dict[str, Any]:
    """fsyncs/s and calls per fsync over the timed window, from two ``cage.stats()``."""
    out: dict[str, Any] = {"stats_before": before, "stats_window_end": after}
    first, last = _fsyncs(before), _fsyncs(after)
    if first is not None and last is not None:
        fsyncs = last - first
        out["fsyncs"] = fsyncs
        out["fsyncs_per_s"] = fsyncs / seconds if seconds > 0 else None
        out["calls_per_fsync"] = calls / fsyncs if fsyncs else None
    return out


def _stop(cage: Any, accounts: Accounts, extra: dict[str, Any]) -> None:
    extra["executed_before_stop"] = accounts.calls
    start = time.perf_counter()
    cage.stop()
    extra["close_s"] = time.perf_counter() - start


def case_pmq_one(work: Path, seconds: float) -> CaseResult:
    """One thread: ``cage.execute.on("loopback_queue").accounts.credit(...)`` in a loop."""
    accounts = Accounts()
    cage = _new_cage(work, accounts)
    open_start = time.perf_counter()
    cage.start()
    extra: dict[str, Any] = {"open_s": time.perf_counter() - open_start}
    latencies: list[int] = []
    try:
        execute = cage.execute
        execute.on(QUEUE).accounts.credit(ACCOUNT, amount=AMOUNT, memo=MEMO)  # warm-up
        stats_before = _stats(cage)
        clock = time.perf_counter_ns
        start = clock()
        deadline = start + int(seconds * 1e9)
        now = start
        while now < deadline:
            before = now
            execute.on(QUEUE).accounts.credit(ACCOUNT, amount=AMOUNT, memo=MEMO)
            now = clock()
            latencies.append(now - before)
        elapsed = (now - start) / 1e9
        stats_after = _stats(cage)
    finally:
        _stop(cage, accounts, extra)
    n = len(latencies)
    extra.update(bu.latency_summary(latencies))
    extra.update(_window_stats(stats_before, stats_after, n, elapsed))
    return CaseResult(
        name="pmq_one",
        label="pmq execute, 1 thread",
        calls=n,
        seconds=elapsed,
        calls_per_s=n / elapsed,
        durability=PMQ_DURABILITY,
        extra=extra,
    )


def case_pmq_threads(work: Path, seconds: float) -> CaseResult:
    """64 threads, each looping ``cage.execute.on("loopback_queue").accounts.credit(...)``."""
    accounts = Accounts()
    cage = _new_cage(work, accounts)
    open_start = time.perf_counter()
    cage.start()
    extra: dict[str, Any] = {"open_s": time.perf_counter() - open_start}
    stop = threading.Event()
    barrier = threading.Barrier(THREAD_PRODUCERS + 1)
    per_thread: list[list[int]] = [[] for _ in range(THREAD_PRODUCERS)]
    errors: list[BaseException] = []

    def producer(latencies: list[int]) -> None:
        execute, clock = cage.execute, time.perf_counter_ns
        barrier.wait()
        try:
            while not stop.is_set():
                before = clock()
                execute.on(QUEUE).accounts.credit(ACCOUNT, amount=AMOUNT, memo=MEMO)
                latencies.append(clock() - before)
        except BaseException as exc:  # reported in the row, the other threads go on
            errors.append(exc)

    threads = [threading.Thread(target=producer, args=(lat,), daemon=True) for lat in per_thread]
    try:
        cage.execute.on(QUEUE).accounts.credit(ACCOUNT, amount=AMOUNT, memo=MEMO)  # warm-up
        for thread in threads:
            thread.start()
        stats_before = _stats(cage)
        barrier.wait()
        start = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        stats_after = _stats(cage)
    finally:
        stop.set()
        _stop(cage, accounts, extra)
    if errors:
        raise errors[0]
    latencies = [x for lat in per_thread for x in lat]
    n = len(latencies)
    extra.update(bu.latency_summary(latencies), producers=THREAD_PRODUCERS)
    extra.update(_window_stats(stats_before, stats_after, n, elapsed))
    return CaseResult(
        name="pmq_threads",
        label=f"pmq execute, {THREAD_PRODUCERS} threads",
        calls=n,
        seconds=elapsed,
        calls_per_s=n / elapsed,
        durability=PMQ_DURABILITY,
        extra=extra,
    )


def case_pmq_asyncio(work: Path, seconds: float) -> CaseResult:
    """1,000 asyncio tasks in ``async with cage``, each looping ``await cage.aexecute...``."""
    accounts = Accounts()
    cage = _new_cage(work, accounts)
    extra: dict[str, Any] = {"producers": ASYNC_PRODUCERS}
    latencies: list[int] = []
    stats: dict[str, Any] = {}

    async def run() -> float:
        stopping = False
        go = asyncio.Event()
        clock = time.perf_counter_ns

        async def producer() -> None:
            aexecute = cage.aexecute
            await go.wait()
            while not stopping:
                before = clock()
                await aexecute.on(QUEUE).accounts.credit(ACCOUNT, amount=AMOUNT, memo=MEMO)
                latencies.append(clock() - before)

        open_start = time.perf_counter()
        async with cage:
            extra["open_s"] = time.perf_counter() - open_start
            await cage.aexecute.on(QUEUE).accounts.credit(ACCOUNT, amount=AMOUNT, memo=MEMO)
            async with asyncio.TaskGroup() as group:
                for _ in range(ASYNC_PRODUCERS):
                    group.create_task(producer())
                await asyncio.sleep(0)  # every task is now waiting on `go`
                stats["before"] = _stats(cage)
                start = time.perf_counter()
                go.set()
                await asyncio.sleep(seconds)
                stopping = True
            elapsed = time.perf_counter() - start
            stats["after"] = _stats(cage)
            extra["executed_before_stop"] = accounts.calls
            close_start = time.perf_counter()
        extra["close_s"] = time.perf_counter() - close_start
        return elapsed

    elapsed = asyncio.run(run())
    n = len(latencies)
    extra.update(bu.latency_summary(latencies))
    extra.update(_window_stats(stats["before"], stats["after"], n, elapsed))
    return CaseResult(
        name="pmq_asyncio",
        label=f"pmq aexecute, {ASYNC_PRODUCERS:,} asyncio tasks",
        calls=n,
        seconds=elapsed,
        calls_per_s=n / elapsed,
        durability=PMQ_DURABILITY,
        extra=extra,
    )


def _transaction(cage: Any) -> None:
    with cage.transaction() as xa:
        for _ in range(BATCH_CALLS):
            xa.on(QUEUE).accounts.credit(ACCOUNT, amount=AMOUNT, memo=MEMO)


def case_pmq_xa(work: Path, seconds: float) -> CaseResult:
    """One thread: ``with cage.transaction() as xa:`` 1,000 x ``xa.on(...).accounts.credit``."""
    accounts = Accounts()
    cage = _new_cage(work, accounts)
    open_start = time.perf_counter()
    cage.start()
    extra: dict[str, Any] = {"open_s": time.perf_counter() - open_start, "batch": BATCH_CALLS}
    latencies: list[int] = []
    try:
        _transaction(cage)  # warm-up
        stats_before = _stats(cage)
        clock = time.perf_counter_ns
        start = clock()
        deadline = start + int(seconds * 1e9)
        now = start
        while now < deadline:
            before = now
            _transaction(cage)
            now = clock()
            latencies.append(now - before)
        elapsed = (now - start) / 1e9
        stats_after = _stats(cage)
    finally:
        _stop(cage, accounts, extra)
    n = len(latencies) * BATCH_CALLS
    extra.update(bu.latency_summary(latencies, "commit_"))
    extra.update(_window_stats(stats_before, stats_after, n, elapsed))
    return CaseResult(
        name="pmq_xa",
        label=f"pmq transactions of {BATCH_CALLS:,} calls",
        calls=n,
        seconds=elapsed,
        calls_per_s=n / elapsed,
        durability=PMQ_DURABILITY,
        extra=extra,
    )


def case_pmq_e2e(work: Path, seconds: float, calls: int, drain_timeout: float) -> CaseResult:
    """Loopback end to end: ``calls`` calls (transactions of 1,000), then ``cage.drain()``.

    The window runs from the first call to ``drain`` returning, so every call in it was stored,
    dispatched and executed; enqueueing also stops after ``seconds`` if ``calls`` takes longer.
    """
    accounts = Accounts()
    cage = _new_cage(work, accounts)
    open_start = time.perf_counter()
    cage.start()
    extra: dict[str, Any] = {"open_s": time.perf_counter() - open_start, "batch": BATCH_CALLS}
    error = None
    try:
        stats_before = _stats(cage)
        clock = time.perf_counter
        start = clock()
        deadline = start + seconds
        made = 0
        while made < calls and clock() < deadline:
            _transaction(cage)
            made += BATCH_CALLS
        enqueued = clock()
        try:
            drained = cage.drain(timeout=drain_timeout)
        except Exception as exc:  # a timeout is a result of this case: report the counts
            drained = exc
        end = clock()
        executed = accounts.calls
        stats_after = _stats(cage)
    finally:
        _stop(cage, accounts, extra)
    elapsed = end - start
    extra.update(
        calls_made=made,
        calls_executed=executed,
        enqueue_s=enqueued - start,
        enqueue_calls_per_s=made / (enqueued - start),
        drain_s=end - enqueued,
        drain_returned=repr(drained),
        drain_timeout_s=drain_timeout,
    )
    extra.update(_window_stats(stats_before, stats_after, made, elapsed))
    if isinstance(drained, Exception):
        error = f"drain(timeout={drain_timeout:g}) raised {drained!r}; executed {executed}/{made}"
    elif drained is False:
        error = f"drain(timeout={drain_timeout:g}) returned False; executed {executed}/{made}"
    elif executed != made:
        error = f"drain returned {drained!r} but the handler ran {executed} times for {made} calls"
    return CaseResult(
        name="pmq_e2e",
        label="pmq loopback end to end (calls + drain)",
        calls=executed,
        seconds=elapsed,
        calls_per_s=executed / elapsed if elapsed > 0 else None,
        durability=PMQ_DURABILITY,
        extra=extra,
        error=error,
    )


def run_case(name: str, work: Path, seconds: float, e2e_calls: int, drain_timeout: float) -> Any:
    """Run one case by name (in the child process) and return its ``CaseResult``."""
    simple = {
        "sqlite_one": case_sqlite_one,
        "sqlite_batch": case_sqlite_batch,
        "pq_ack": case_persist_queue,
        "pmq_one": case_pmq_one,
        "pmq_threads": case_pmq_threads,
        "pmq_asyncio": case_pmq_asyncio,
        "pmq_xa": case_pmq_xa,
    }
    if name == "pmq_e2e":
        return case_pmq_e2e(work, seconds, e2e_calls, drain_timeout)
    return simple[name](work, seconds)
