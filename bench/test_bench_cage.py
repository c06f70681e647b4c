"""pytest-benchmark suite of the cage: the pmq cases of bench/compare_local.py, round by round.

Run it with::

    .venv/bin/python -m pytest bench/test_bench_cage.py --benchmark-only
    .venv/bin/python -m pytest bench/test_bench_cage.py --benchmark-only \\
        --benchmark-min-rounds 3 --benchmark-save cage         # keep the JSON to compare later

Owns: durable enqueue of ``accounts.credit(12345, amount=10, memo="x" * 40)`` to
"loopback_queue" from 1 thread, from 64 threads, from 1,000 asyncio tasks and in transactions of
10, 100 and 1,000 calls, and loopback end to end (calls, then ``cage.drain()``). Must not: run in
the default ``make test`` (which collects tests/ only), or use anything but pmq's public API.

Invariants:
- The whole module is skipped, with the reason, while ``pmq.Cage`` cannot be imported.
- ``benchmark.pedantic`` with a setup function: every round gets a fresh data directory and a
  freshly started cage; starting it, creating the producer threads/tasks, and stopping and
  deleting the previous round's cage are not timed. A round makes a fixed number of calls.
- Handlers run during the enqueue rounds too (as in compare_local.py): the figure is the enqueue
  rate. The end-to-end round times its calls and the ``drain`` that waits for all of them, and
  fails if the handler did not run exactly once per call.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

import _benchutil as bu
from _compare_cases import (
    ACCOUNT,
    AMOUNT,
    ASYNC_PRODUCERS,
    CAGE_NAME,
    MEMO,
    QUEUE,
    THREAD_PRODUCERS,
    Accounts,
)

try:
    from pmq import Cage
except Exception as exc:  # ImportError while the cage is being written; anything else: say it
    pytest.skip(
        f"pmq.Cage is not importable yet ({type(exc).__name__}: {exc}); build it: make build",
        allow_module_level=True,
    )

ONE_THREAD_CALLS = 200
CALLS_PER_THREAD = 20
CALLS_PER_TASK = 10
XA_SIZES = (10, 100, 1000)
XA_MAX_CALLS = 20_000
E2E_CALLS = 20_000
E2E_XA = 1000
DRAIN_TIMEOUT_S = 60.0


def _record_throughput(benchmark: Any, calls: int) -> None:
    benchmark.extra_info["calls_per_round"] = calls
    stats = getattr(benchmark, "stats", None)
    mean = getattr(getattr(stats, "stats", None), "mean", None)
    if mean:
        benchmark.extra_info["calls_per_s"] = calls / mean


class _Rounds:
    """Hands each round a fresh, started cage; stops and deletes the previous one first."""

    def __init__(self, base: Path, name: str) -> None:
        self.base = base
        self.name = name
        self.count = 0
        self.cage: Any = None
        self.accounts = Accounts()
        self.directory: Path | None = None

    def fresh_cage(self, start: bool = True) -> Any:
        self.finish()
        self.count += 1
        self.directory = self.base / f"{self.name}-{self.count}"
        self.directory.mkdir()
        self.accounts = Accounts()
        self.cage = Cage(CAGE_NAME, data_dir=str(self.directory))
        self.cage.expose("accounts", self.accounts)
        if start:
            self.cage.start()
        return self.cage

    def finish(self) -> None:
        if self.cage is not None:
            cage, self.cage = self.cage, None
            cage.stop()
        if self.directory is not None:
            bu.remove_tree(self.directory)
            self.directory = None


def _credit(target: Any) -> Any:
    """``target.on("loopback_queue").accounts.credit(...)``: the call of every case."""
    return target.on(QUEUE).accounts.credit(ACCOUNT, amount=AMOUNT, memo=MEMO)


def test_execute_one_thread(benchmark: Any, bench_base: Path, rounds: int) -> None:
    """One thread: ``cage.execute.on("loopback_queue").accounts.credit(...)``, one at a time."""
    benchmark.group = "cage enqueue"
    holder = _Rounds(bench_base, "one")

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (holder.fresh_cage(),), {}

    def run(cage: Any) -> None:
        execute = cage.execute
        for _ in range(ONE_THREAD_CALLS):
            _credit(execute)

    try:
        benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
    finally:
        holder.finish()
    _record_throughput(benchmark, ONE_THREAD_CALLS)


def test_execute_threads(benchmark: Any, bench_base: Path, rounds: int) -> None:
    """64 threads, each making 20 ``execute`` calls; the threads start before the clock does."""
    benchmark.group = "cage enqueue"
    holder = _Rounds(bench_base, "threads")
    state: dict[str, Any] = {}

    def producer(cage: Any, go: threading.Event, errors: list[BaseException]) -> None:
        execute = cage.execute
        go.wait()
        try:
            for _ in range(CALLS_PER_THREAD):
                _credit(execute)
        except BaseException as exc:  # re-raised by the round
            errors.append(exc)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        cage = holder.fresh_cage()
        go = threading.Event()
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=producer, args=(cage, go, errors), daemon=True)
            for _ in range(THREAD_PRODUCERS)
        ]
        for thread in threads:
            thread.start()
        state.update(go=go, threads=threads, errors=errors)
        return (), {}

    def run() -> None:
        state["go"].set()
        for thread in state["threads"]:
            thread.join()
        if state["errors"]:
            raise state["errors"][0]

    try:
        benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
    finally:
        if "go" in state:
            state["go"].set()
        holder.finish()
    _record_throughput(benchmark, THREAD_PRODUCERS * CALLS_PER_THREAD)


class _AsyncRound:
    """A cage under ``async with`` on a loop in a background thread, 1,000 tasks at the gate.

    ``run()`` opens the gate and waits until every task has made its calls; ``finish()`` leaves
    the ``async with`` (stopping the cage) and joins the thread.
    """

    def __init__(self, cage: Any) -> None:
        self.cage = cage
        self.ready = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.go: asyncio.Event | None = None
        self.leave: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        self.ready.wait()
        if self.error is not None:
            raise self.error

    def _main(self) -> None:
        try:
            asyncio.run(self._drive())
        except BaseException as exc:  # re-raised in the benchmark's thread
            self.error = exc
        finally:
            self.ready.set()
            self.done.set()

    async def _drive(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.go, self.leave = asyncio.Event(), asyncio.Event()
        go = self.go

        async def producer() -> None:
            aexecute = self.cage.aexecute
            await go.wait()
            for _ in range(CALLS_PER_TASK):
                await _credit(aexecute)

        async with self.cage:
            tasks = [asyncio.create_task(producer()) for _ in range(ASYNC_PRODUCERS)]
            await asyncio.sleep(0)  # every task is now waiting at the gate
            self.ready.set()
            try:
                await asyncio.gather(*tasks)
            finally:
                self.done.set()
            await self.leave.wait()

    def run(self) -> None:
        assert self.loop is not None and self.go is not None
        self.loop.call_soon_threadsafe(self.go.set)
        self.done.wait()
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        if self.loop is not None and self.leave is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.leave.set)
        self.thread.join()
        if self.error is not None:
            raise self.error


def test_aexecute_asyncio(benchmark: Any, bench_base: Path, rounds: int) -> None:
    """1,000 asyncio tasks, each making 10 ``await cage.aexecute...`` calls."""
    benchmark.group = "cage enqueue"
    holder = _Rounds(bench_base, "asyncio")
    current: list[_AsyncRound] = []

    def finish_round() -> None:
        while current:
            current.pop().finish()
        holder.cage = None  # stopped by leaving its `async with`
        holder.finish()

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        finish_round()
        current.append(_AsyncRound(holder.fresh_cage(start=False)))
        return (current[-1],), {}

    def run(round_: _AsyncRound) -> None:
        round_.run()

    try:
        benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
    finally:
        finish_round()
    _record_throughput(benchmark, ASYNC_PRODUCERS * CALLS_PER_TASK)


@pytest.mark.parametrize("size", XA_SIZES, ids=[f"xa{size}" for size in XA_SIZES])
def test_transaction(benchmark: Any, bench_base: Path, rounds: int, size: int) -> None:
    """One thread: ``with cage.transaction() as xa:`` ``size`` x ``xa.on(...)...credit(...)``."""
    benchmark.group = "cage enqueue"
    holder = _Rounds(bench_base, f"xa{size}")
    transactions = max(1, min(200, XA_MAX_CALLS // size))

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (holder.fresh_cage(),), {}

    def run(cage: Any) -> None:
        for _ in range(transactions):
            with cage.transaction() as xa:
                for _ in range(size):
                    _credit(xa)

    try:
        benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
    finally:
        holder.finish()
    benchmark.extra_info.update(transaction_size=size, transactions=transactions)
    _record_throughput(benchmark, transactions * size)


def test_loopback_end_to_end(benchmark: Any, bench_base: Path, rounds: int) -> None:
    """20,000 calls in transactions of 1,000, then ``cage.drain()``; each ran exactly once."""
    benchmark.group = "cage end to end"
    holder = _Rounds(bench_base, "e2e")

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (holder.fresh_cage(),), {}

    def run(cage: Any) -> None:
        for _ in range(E2E_CALLS // E2E_XA):
            with cage.transaction() as xa:
                for _ in range(E2E_XA):
                    _credit(xa)
        drained = cage.drain(timeout=DRAIN_TIMEOUT_S)
        executed = holder.accounts.calls
        assert drained is not False and executed == E2E_CALLS, (
            f"drain(timeout={DRAIN_TIMEOUT_S}) returned {drained!r} after the handler ran "
            f"{executed} times for {E2E_CALLS} calls"
        )

    try:
        benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
    finally:
        holder.finish()
    _record_throughput(benchmark, E2E_CALLS)
