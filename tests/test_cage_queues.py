"""The local cage: order, concurrency, restarts, back-pressure, disk, locking, space, stats.

Checks the queue-level promises: FIFO and head-of-line blocking in ordered queues, the
concurrency bound, resuming after a restart, ``QueueFull`` back-pressure (calls to a peer stay
in its outbound queue: there is no transport yet), a failing fsync, one cage per directory,
the data directory shrinking once a backlog drains, and ``stats()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import pmq
from helpers import FAST_RETRY, KIB, LIMIT_S, MIB, Log, next_seq, wait_until
from pmq.dispatch import QUICK_HANDLER_SECONDS, _mean_duration
from pmq.errors import JournalLocked
from pmq.store import Store

# ---- order and concurrency -------------------------------------------------------------------


def test_ordered_queue_runs_in_order_and_a_failing_head_blocks(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """ordered=True: one call at a time, in order; a failing call is retried before the next."""
    log = Log()
    running = [0]
    most = [0]
    lock = threading.Lock()

    class Mod:
        def f(self, n: int) -> None:
            attempt = pmq.current_call().attempt  # type: ignore[union-attr]
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            try:
                log.add((n, attempt))
                if (n == 0 and attempt < 4) or (n == 5 and attempt < 2):
                    raise RuntimeError(f"call {n} fails on attempt {attempt}")
            finally:
                with lock:
                    running[0] -= 1

    cage = make_cage(expose={"mod": Mod()},
                     queues={"loopback_queue": {"ordered": True, "retry_initial": 0.01}})
    with cage.transaction() as xa:
        for n in range(10):
            xa.on("loopback_queue").mod.f(n)
    for n in range(10, 15):
        cage.execute.on("loopback_queue").mod.f(n)
    cage.drain(timeout=LIMIT_S)
    order = [n for n, _ in log.items]
    assert order == sorted(order), f"ran out of order: {log.items}"
    assert [a for n, a in log.items if n == 0] == [1, 2, 3, 4]
    assert [a for n, a in log.items if n == 5] == [1, 2]
    assert sorted(set(order)) == list(range(15))
    assert most[0] == 1


def test_concurrency_limit_is_respected(make_cage: Callable[..., pmq.Cage]) -> None:
    """No more than ``concurrency`` handlers of a queue run at once, and that many do."""
    limit = 3
    running = [0]
    most = [0]
    lock = threading.Lock()
    first_wave = threading.Barrier(limit, timeout=LIMIT_S)

    class Mod:
        def f(self, n: int) -> None:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            try:
                if n < limit:
                    first_wave.wait()  # proves `limit` run together (else it times out)
                time.sleep(0.005)
            finally:
                with lock:
                    running[0] -= 1

        async def g(self) -> None:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            await asyncio.sleep(0.005)
            with lock:
                running[0] -= 1

    cage = make_cage(expose={"mod": Mod()}, workers=8,
                     queues={"loopback_queue": {"concurrency": limit}})
    with cage.transaction() as xa:
        for n in range(30):
            xa.on("loopback_queue").mod.f(n)
        for _ in range(30):
            xa.on("loopback_queue").mod.g()
    cage.drain(timeout=LIMIT_S)
    assert most[0] == limit


# ---- restart ---------------------------------------------------------------------------------


def test_restart_resumes_pending_calls_with_their_attempt_count(
    make_cage: Callable[..., pmq.Cage], tmp_path: Path
) -> None:
    """Calls pending at stop run after a restart; one that had failed continues at attempt 2."""
    started = threading.Event()
    gate = threading.Event()
    log = Log()

    class Blocking:
        def f(self, n: int) -> None:
            log.add((n, pmq.current_call().attempt))  # type: ignore[union-attr]
            started.set()
            assert gate.wait(LIMIT_S)
            raise RuntimeError("fails once; the hour-long backoff outlives the cage")

    policy = {"loopback_queue": {"ordered": True, "retry_initial": 3600.0, "retry_max": 3600.0}}
    cage = make_cage(expose={"mod": Blocking()}, queues=policy)
    ids = [cage.execute.on("loopback_queue").mod.f(n) for n in range(5)]
    assert started.wait(LIMIT_S)
    gate.set()
    cage.stop()  # waits for the running handler, keeps the rest pending
    assert log.items == [(0, 1)]

    resumed = Log()

    class Recording:
        def f(self, n: int) -> None:
            info = pmq.current_call()
            assert info is not None
            resumed.add((n, info.attempt, info.call_id))

    store = Store(str(tmp_path / "solo"), "solo")  # look before a dispatcher can take it
    try:
        assert store.status(ids[0]) == pmq.CallStatus("accepted", None, 1)
        assert store.outstanding() == 5
    finally:
        store.close()
    again = make_cage(data_dir=tmp_path / "solo", expose={"mod": Recording()}, queues=policy)
    again.drain(timeout=LIMIT_S)
    assert resumed.items == [(0, 2, ids[0])] + [(n, 1, ids[n]) for n in range(1, 5)]


# ---- back-pressure ---------------------------------------------------------------------------


def test_queue_full_refuses_the_call_and_stores_nothing(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """Over max_pending the queued call raises QueueFull (with the numbers) and is not stored."""
    cage = make_cage(peers={"ledger": "127.0.0.1:1"},
                     queues={"ledger_queue": {"max_pending": 5}})
    for n in range(5):
        cage.execute.on("ledger_queue").accounts.credit(n)
    before = next_seq(cage)
    with pytest.raises(pmq.QueueFull) as caught:
        cage.execute.on("ledger_queue").accounts.credit(5)
    error = caught.value
    assert error.queue == "ledger_queue" and error.pending == 5 and error.max_pending == 5
    assert error.retriable
    assert next_seq(cage) == before
    assert cage.store is not None and cage.store.pending("ledger_queue", outbound=True) == 5
    cage.execute.on("loopback_queue").mod.f()  # other queues are not affected


def test_queue_full_counts_bytes_too(make_cage: Callable[..., pmq.Cage]) -> None:
    """max_pending_bytes refuses a call whose arguments would take the queue over the limit."""
    cage = make_cage(peers={"ledger": "127.0.0.1:1"},
                     queues={"ledger_queue": {"max_pending_bytes": 10_000}})
    cage.execute.on("ledger_queue").accounts.credit(b"x" * 6000)
    before = next_seq(cage)
    with pytest.raises(pmq.QueueFull):
        cage.execute.on("ledger_queue").accounts.credit(b"x" * 6000)
    assert next_seq(cage) == before


def test_aexecute_with_wait_waits_for_room(make_cage: Callable[..., pmq.Cage]) -> None:
    """aexecute(wait=True) on a full queue waits instead of raising; cancelled, stores nothing."""
    cage = make_cage(peers={"ledger": "127.0.0.1:1"},
                     queues={"ledger_queue": {"max_pending": 5}})
    for n in range(5):
        cage.execute.on("ledger_queue").accounts.credit(n)
    before = next_seq(cage)

    async def main() -> None:
        with pytest.raises(pmq.QueueFull):
            await cage.aexecute.on("ledger_queue").accounts.credit(5)
        task = asyncio.ensure_future(cage.aexecute.on("ledger_queue", wait=True).accounts.credit(5))
        done, _ = await asyncio.wait({task}, timeout=0.5)
        assert not done, "aexecute(wait=True) returned although the queue stayed full"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert next_seq(cage) == before
    assert cage.store is not None and cage.store.pending("ledger_queue", outbound=True) == 5


def test_concurrent_aexecute_calls_keep_their_own_outcomes(
    make_cage: Callable[..., pmq.Cage]
) -> None:
    """Calls made by many tasks at once are stored together, yet each caller gets what it would
    have got alone: its id, the id of the call its user id repeats, or QueueFull."""
    cage = make_cage(peers={"ledger": "127.0.0.1:1"},
                     queues={"ledger_queue": {"max_pending": 41}})
    before = next_seq(cage)

    async def main() -> list[object]:
        calls = [cage.aexecute.on("ledger_queue").accounts.credit(n) for n in range(40)]
        calls += [cage.aexecute.on("ledger_queue", id="same").accounts.credit(n) for n in (1, 2)]
        calls.append(cage.aexecute.on("ledger_queue").accounts.credit(99))  # one too many
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert all(isinstance(o, str) for o in outcomes[:40])
    assert len(set(outcomes[:40])) == 40
    assert outcomes[40:42] == ["same", "same"]  # the second was recognised as the first
    assert isinstance(outcomes[42], pmq.QueueFull)
    assert cage.store is not None and cage.store.pending("ledger_queue", outbound=True) == 41
    assert next_seq(cage) - before == 41  # one record per stored call, nothing else
    assert {cage.call_status(str(o)).state for o in outcomes[:41]} == {"stored"}


def test_a_cancelled_aexecute_caller_does_not_disturb_the_others(
    make_cage: Callable[..., pmq.Cage]
) -> None:
    """Cancelling one waiting caller leaves the calls made beside it to complete normally."""
    cage = make_cage(peers={"ledger": "127.0.0.1:1"})

    async def main() -> list[object]:
        first = asyncio.ensure_future(cage.aexecute.on("ledger_queue").accounts.credit(1))
        others = [cage.aexecute.on("ledger_queue").accounts.credit(n) for n in range(5)]
        first.cancel()
        return await asyncio.gather(*others)

    ids = asyncio.run(main())
    assert len(set(ids)) == 5
    assert {cage.call_status(str(i)).state for i in ids} == {"stored"}


def test_aexecute_outside_a_running_loop_says_where_it_must_be_called(
    make_cage: Callable[..., pmq.Cage]
) -> None:
    """aexecute called from plain code raises a RuntimeError that names execute."""
    cage = make_cage()
    with pytest.raises(RuntimeError, match=r"cage\.execute"):
        cage.aexecute.on("loopback_queue").mod.f()


# ---- a failing disk --------------------------------------------------------------------------


def test_failed_fsync_refuses_new_calls_and_keeps_what_was_durable(
    make_cage: Callable[..., pmq.Cage], tmp_path: Path
) -> None:
    """After an fsync fails the cage refuses calls (JournalFailed); a restart runs what was kept."""
    # The handler of an acknowledged call is running when the disk fails, so its completion can
    # not be recorded: after the restart it runs again, with attempt 2 (DESIGN.md §2).
    import errno

    from pmq import _journal

    started = threading.Event()
    gate = threading.Event()
    log = Log()

    class Mod:
        def f(self, n: int) -> None:
            log.add((n, pmq.current_call().attempt))  # type: ignore[union-attr]
            started.set()
            assert gate.wait(LIMIT_S)

    cage = make_cage(expose={"mod": Mod()})
    acknowledged = cage.execute.on("loopback_queue").mod.f(1)
    assert started.wait(LIMIT_S)
    _journal._set_fault("sync", 1, errno.EIO)
    try:
        with pytest.raises(pmq.JournalFailed):
            cage.execute.on("loopback_queue").mod.f(2)
        with pytest.raises(pmq.JournalFailed):
            cage.execute.on("loopback_queue").mod.f(3)
    finally:
        _journal._clear_faults()
        gate.set()
    with contextlib.suppress(pmq.JournalFailed):  # stop may report the failure; it must return
        cage.stop()
    assert log.items == [(1, 1)]

    again = make_cage(data_dir=tmp_path / "solo", expose={"mod": Mod()})
    again.drain(timeout=LIMIT_S)
    assert (1, 2) in log.items  # the acknowledged call ran again: its DONE never got to disk
    assert (3, 1) not in log.items  # refused before it was stored
    assert again.call_status(acknowledged).state == "executed"


@pytest.mark.parametrize("accepted_durable", [True, False], ids=["accepted-durable",
                                                               "accepted-appended"])
def test_failed_attempt_fsync_on_a_worker_runs_no_handler(tmp_path: Path,
                                                          accepted_durable: bool) -> None:
    """A round of a peer's calls has its ATTEMPT record made durable by the worker that runs it
    (docs/decisions.md): when that fsync fails, no handler runs, the dispatcher stops with the
    error, and the calls are still there when the directory is opened again. The dispatcher
    may take calls whose own records are only appended (``accepted-appended``): the failed
    fsync is then the one that would have made them durable, and still nothing runs."""
    import errno

    from pmq import _journal
    from pmq._codec import pack_arguments
    from pmq._config import QueuePolicy
    from pmq.dispatch import Dispatcher, Registry

    ran = Log()

    class Mod:
        def f(self, n: int) -> None:
            ran.add(n)

    registry = Registry()
    registry.expose("mod", Mod())
    store = Store(str(tmp_path / "b"), "b")
    dispatcher = Dispatcher(store, registry, lambda name: QueuePolicy(), cage=None, workers=2)
    now = time.time()
    calls = [(key, "mod", "f", pack_arguments([key], {}), None, None, now) for key in (1, 2, 3)]
    try:
        seq, high, _ = store.accept("a", b"\x01" * 16, calls, 0, lambda module, method: None)
        assert high == 3
        if accepted_durable:
            store.journal.sync(seq)
        _journal._set_fault("sync", 1, errno.EIO)
        try:
            with pytest.raises(pmq.JournalFailed):
                asyncio.run(asyncio.wait_for(dispatcher.run(), LIMIT_S))
        finally:
            _journal._clear_faults()
        assert ran.items == []
    finally:
        store.close()

    again = Store(str(tmp_path / "b"), "b")
    try:
        assert [call.arguments for call in again.take("a_queue", 10)] == [c[3] for c in calls]
    finally:
        again.close()


# ---- one cage per directory ------------------------------------------------------------------


def test_second_cage_on_the_same_data_dir_is_locked_out(
    make_cage: Callable[..., pmq.Cage], tmp_path: Path
) -> None:
    """A second Cage on a data_dir in use raises JournalLocked from start(); the first goes on."""
    log = Log()

    class Mod:
        def f(self) -> None:
            log.add(1)

    first = make_cage(expose={"mod": Mod()})
    second = make_cage(name="other", data_dir=tmp_path / "solo", start=False)
    with pytest.raises(JournalLocked):
        second.start()
    assert second.store is None
    first.execute.on("loopback_queue").mod.f()
    first.drain(timeout=LIMIT_S)
    assert log.items == [1]
    first.stop()
    second.start()  # free once the first has stopped


def test_cage_in_another_process_locks_the_data_dir(
    make_cage: Callable[..., pmq.Cage], tmp_path: Path
) -> None:
    """A cage running in another process holds its data_dir: start() here raises JournalLocked."""
    data_dir = tmp_path / "shared"
    script = textwrap.dedent("""
        import sys, pmq
        with pmq.Cage("holder", data_dir=sys.argv[1]):
            print("ready", flush=True)
            sys.stdin.read()
    """)
    child = subprocess.Popen([sys.executable, "-c", script, str(data_dir)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        cage = make_cage(data_dir=data_dir, start=False)
        with pytest.raises(JournalLocked):
            cage.start()
    finally:
        child.communicate(timeout=LIMIT_S)
    assert child.returncode == 0
    cage.start()


# ---- space -----------------------------------------------------------------------------------


def _directory_bytes(path: Path) -> int:
    """Bytes of the files under `path`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fill(cage: pmq.Cage, calls: int, per_transaction: int = 40) -> None:
    """Queue `calls` loopback calls of ~8 KiB each, a transaction at a time."""
    for start in range(0, calls, per_transaction):
        with cage.transaction() as xa:
            for n in range(start, min(calls, start + per_transaction)):
                xa.on("loopback_queue").mod.f(n, b"p" * (8 * KIB))


def test_data_dir_shrinks_again_once_a_backlog_drains(
    make_cage: Callable[..., pmq.Cage], tmp_path: Path
) -> None:
    """After several segments of calls complete, maintenance deletes the old segments."""
    log = Log()

    class Mod:
        def f(self, n: int, padding: bytes) -> None:
            log.add(n)

    cage = make_cage(expose={"mod": Mod()}, segment_bytes=1 * MIB)
    assert cage.store is not None
    _fill(cage, 900)  # ~7 MiB of calls
    cage.drain(timeout=LIMIT_S)
    segments_before = len(cage.store.journal.segments())
    bytes_before = _directory_bytes(tmp_path / "solo")
    assert segments_before >= 4
    assert cage.store.maintain(force=True)
    segments_after = len(cage.store.journal.segments())
    bytes_after = _directory_bytes(tmp_path / "solo")
    assert segments_after <= 2 < segments_before
    assert bytes_after < bytes_before / 2
    assert len(set(log.items)) == 900
    cage.stop()
    again = make_cage(data_dir=tmp_path / "solo", expose={"mod": Mod()}, segment_bytes=1 * MIB)
    assert again.store is not None and again.store.outstanding() == 0


def test_a_dead_letter_does_not_pin_old_segments(
    make_cage: Callable[..., pmq.Cage], tmp_path: Path
) -> None:
    """A dead letter from the first segment is copied forward, so old segments still go."""
    log = Log()

    class Mod:
        def f(self, n: int, padding: bytes) -> None:
            if n < 0:
                raise pmq.Reject("the first call stays dead")
            log.add(n)

    cage = make_cage(expose={"mod": Mod()}, segment_bytes=1 * MIB)
    assert cage.store is not None
    dead_id = cage.execute.on("loopback_queue").mod.f(-1, b"")
    _fill(cage, 900)
    cage.drain(timeout=LIMIT_S)
    letters = cage.dead_letters()
    assert [letter.call_id for letter in letters] == [dead_id]
    segments_before = len(cage.store.journal.segments())
    assert segments_before >= 4
    cage.store.maintain(force=True)
    assert len(cage.store.journal.segments()) <= 2 < segments_before
    assert cage.store.journal.floor > 1
    assert cage.dead_letters() == letters
    cage.stop()
    again = make_cage(data_dir=tmp_path / "solo", expose={"mod": Mod()}, segment_bytes=1 * MIB)
    assert again.dead_letters() == letters
    again.purge(dead_id)
    assert again.dead_letters() == []


# ---- stats -----------------------------------------------------------------------------------


def test_stats_counts_what_happened(make_cage: Callable[..., pmq.Cage]) -> None:
    """stats() has the store, dispatcher and journal counters, and they add up."""

    class Mod:
        def ok(self) -> None:
            pass

        def flaky(self) -> None:
            if pmq.current_call().attempt == 1:  # type: ignore[union-attr]
                raise RuntimeError("first attempt fails")

        def refuse(self) -> None:
            raise pmq.Reject("no")

    cage = make_cage(expose={"mod": Mod()}, peers={"ledger": "127.0.0.1:1"},
                     queues={"loopback_queue": FAST_RETRY})
    for _ in range(3):
        cage.execute.on("loopback_queue").mod.ok()
    cage.execute.on("loopback_queue").mod.flaky()
    refused = cage.execute.on("loopback_queue").mod.refuse()
    cage.execute.on("loopback_queue").nothing.here()
    cage.execute.on("loopback_queue", id="dup").mod.ok()
    cage.execute.on("loopback_queue", id="dup").mod.ok()
    cage.execute.on("ledger_queue").accounts.credit(1)
    # The dispatcher counts an outcome just after the store recorded it: wait for the counts.
    wait_until(lambda: cage.stats()["dispatch"]["executed"] == 5
               and cage.stats()["dispatch"]["rejected"] == 1
               and cage.stats()["dispatch"]["not_exposed"] == 1, "the loopback queue drains")
    cage.replay(refused)
    wait_until(lambda: cage.stats()["dispatch"]["rejected"] == 2,
               "the replayed call is buried again")

    stats = cage.stats()
    counters = stats["counters"]
    assert set(counters) >= {"enqueued", "duplicates", "attempts", "completed", "failed",
                             "dead", "revived", "purged", "relocated"}
    assert counters["enqueued"] == 8  # the second "dup" was not stored
    assert counters["duplicates"] == 1
    assert counters["completed"] == 5  # 3 ok, flaky, dup
    assert counters["attempts"] == 8  # 5 completed, flaky's failure, refuse twice (not "here")
    assert counters["failed"] == 1
    assert counters["dead"] == 3  # refuse twice, not exposed once
    assert counters["revived"] == 1
    dispatch = stats["dispatch"]
    assert set(dispatch) >= {"executed", "failed", "retried", "rejected", "expired",
                             "not_exposed", "too_many_attempts", "crashed"}
    assert dispatch["executed"] == 5 and dispatch["failed"] == 1
    assert dispatch["rejected"] == 2 and dispatch["not_exposed"] == 1
    assert stats["dead"] == 2
    assert stats["queues"][("ledger_queue", True)] == {"waiting": 1, "taken": 0}
    assert stats["queues"][("loopback_queue", False)] == {"waiting": 0, "taken": 0}
    journal = stats["journal"]
    assert set(journal) >= {"records", "frames", "flushes", "fsyncs", "bytes", "segments"}
    assert journal["fsyncs"] >= 1


def test_one_long_pause_does_not_make_quick_handlers_slow() -> None:
    """A quick handler that waited out a long pause (a full collection, a busy event loop)
    leaves the dispatcher running batches on one worker; handlers that really are slow make
    it wake more within a few calls."""
    mean = 0.0
    for _ in range(100):
        mean = _mean_duration(mean, 0.000_003)
    mean = _mean_duration(mean, 0.050)  # one 50 ms wait for the GIL
    assert mean < QUICK_HANDLER_SECONDS
    for _ in range(16):
        mean = _mean_duration(mean, 0.010)  # handlers that each block for 10 ms
    assert mean >= QUICK_HANDLER_SECONDS


def test_a_handler_that_blocks_does_not_hold_up_the_quick_calls_behind_it(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """Quick handlers run a round on one worker; when one of them blocks, the calls queued
    behind it still run, on another worker, while it waits."""
    gate = threading.Event()
    ran = Log()

    class Mod:
        def block(self) -> None:
            gate.wait(LIMIT_S)
            ran.add("block")

        def quick(self, n: int) -> None:
            ran.add(n)

    cage = make_cage(expose={"mod": Mod()}, workers=4)
    with cage.transaction() as xa:  # the handlers are known to be quick
        for n in range(100):
            xa.on("loopback_queue").mod.quick(n)
    ran.wait_for(100)
    with cage.transaction() as xa:
        xa.on("loopback_queue").mod.block()
        for n in range(100, 120):
            xa.on("loopback_queue").mod.quick(n)
    try:
        assert "block" not in ran.wait_for(120)
    finally:
        gate.set()
    ran.wait_for(121)
    cage.drain(timeout=LIMIT_S)
