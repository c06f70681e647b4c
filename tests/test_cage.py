"""The local cage: lifecycle, execute/aexecute, handlers, retries, dead letters, transactions.

Everything here runs one cage (sometimes two on one directory, or a second process) on a data
directory under ``tmp_path`` on the real disk, with loopback calls only: the transport does not
exist yet, so calls to a peer stay in its outbound queue, which is what the back-pressure tests
use. The promises checked are DESIGN.md §1 and §2 as cage.py implements them, and the choices
written down in docs/decisions.md, "Cage (local)".

Nothing asserts on time. Waiting is done with ``cage.drain(timeout=...)`` or an Event with a
generous limit; a handler that must hold still waits on an Event the test sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pmq
from pmq._codec import pack_arguments
from pmq.errors import JournalLocked
from pmq.store import NewCall, Store

#: How long any wait may take before the test calls it a hang (not a measured time).
LIMIT_S = 60.0
#: Queue policy that makes retries come at once.
FAST_RETRY = {"retry_initial": 0.01, "retry_max": 0.05}
KIB = 1024
MIB = 1024 * KIB


class Log:
    """A thread-safe list of what handlers saw, with a way to wait for a number of entries."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._cond = threading.Condition()

    def add(self, item: Any) -> None:
        """Record one entry and wake whoever waits."""
        with self._cond:
            self.items.append(item)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = LIMIT_S) -> list[Any]:
        """Wait until `count` entries are there; fail the test if they never come."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.items) >= count, timeout)
            assert ok, f"only {len(self.items)} of {count} entries after {timeout} s"
            return list(self.items)


@pytest.fixture
def make_cage(tmp_path: Path) -> Iterator[Callable[..., pmq.Cage]]:
    """Make cages on directories under tmp_path (started unless start=False); stop them all."""
    made: list[pmq.Cage] = []

    def make(name: str = "solo", data_dir: Path | None = None, *, start: bool = True,
             **kwargs: Any) -> pmq.Cage:
        cage = pmq.Cage(name, data_dir=data_dir if data_dir is not None else tmp_path / name,
                        **kwargs)
        made.append(cage)
        if start:
            cage.start()
        return cage

    yield make
    for cage in reversed(made):
        cage.stop()


def next_seq(cage: pmq.Cage) -> int:
    """The journal's next sequence number: unchanged means nothing was stored."""
    assert cage.store is not None
    return cage.store.journal.next_seq


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = LIMIT_S) -> None:
    """Poll `predicate` until it holds; fail naming `what` if it never does."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: still not true after {timeout} s"
        time.sleep(0.01)


# ---- lifecycle -------------------------------------------------------------------------------


def test_start_then_stop_runs_a_loopback_call(make_cage: Callable[..., pmq.Cage]) -> None:
    """start() runs the dispatcher; a loopback call runs with its arguments; stop() closes."""
    log = Log()

    class Invoices:
        def reconcile(self, account: int, *, amount: int) -> None:
            log.add((account, amount))

    cage = make_cage(start=False, expose={"invoices": Invoices()})
    assert "stopped" in repr(cage)
    cage.start()
    assert "running" in repr(cage)
    call_id = cage.execute.on("loopback_queue").invoices.reconcile(42, amount=10)
    assert isinstance(call_id, str) and call_id.startswith("solo:")
    cage.drain(timeout=LIMIT_S)
    assert log.items == [(42, 10)]
    cage.stop()
    assert cage.store is None and "stopped" in repr(cage)
    cage.stop()  # a second stop is harmless


def test_with_block_starts_and_stops_the_cage(tmp_path: Path) -> None:
    """``with Cage(...)`` starts the cage for the block and stops it after."""
    log = Log()

    class Mod:
        def f(self, x: int) -> None:
            log.add(x)

    with pmq.Cage("solo", data_dir=tmp_path / "solo", expose={"mod": Mod()}) as cage:
        cage.execute.on("loopback_queue").mod.f(1)
        cage.drain(timeout=LIMIT_S)
    assert log.items == [1]
    assert cage.store is None
    with pmq.Cage("solo", data_dir=tmp_path / "solo"):  # the directory was released
        pass


def test_expose_after_construction_and_call_to_the_cages_own_name(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """cage.expose() adds a module; execute.on("<own name>_queue") is a loopback call."""
    log = Log()

    class Mod:
        def f(self) -> None:
            log.add(pmq.current_call().queue)  # type: ignore[union-attr]

    cage = make_cage(start=False)
    cage.expose("mod", Mod())
    cage.start()
    cage.execute.on("solo_queue").mod.f()
    cage.drain(timeout=LIMIT_S)
    assert log.items == ["loopback_queue"]


def test_starting_a_started_cage_raises(make_cage: Callable[..., pmq.Cage]) -> None:
    """start() on a running cage raises RuntimeError instead of opening the directory twice."""
    cage = make_cage()
    with pytest.raises(RuntimeError, match="already started"):
        cage.start()


def test_execute_before_start_raises(make_cage: Callable[..., pmq.Cage]) -> None:
    """A call on a cage that was never started raises RuntimeError saying to start it."""
    cage = make_cage(start=False, expose={"mod": object()})
    with pytest.raises(RuntimeError, match="start"):
        cage.execute.on("loopback_queue").mod.f()


def test_async_with_cage_runs_plain_and_async_handlers(tmp_path: Path) -> None:
    """``async with pmq.Cage`` + ``await aexecute`` + ``await adrain`` run both kinds of handler."""
    log = Log()

    class Mod:
        def plain(self, x: int) -> None:
            log.add(("plain", x, threading.current_thread().name))

        async def coro(self, x: int) -> None:
            await asyncio.sleep(0)
            log.add(("async", x, threading.current_thread().name))

    async def main() -> tuple[str, str]:
        async with pmq.Cage("solo", data_dir=tmp_path / "solo", expose={"mod": Mod()}) as cage:
            first = await cage.aexecute.on("loopback_queue").mod.plain(1)
            second = await cage.aexecute.on("loopback_queue").mod.coro(2)
            await cage.adrain(timeout=LIMIT_S)
            assert cage.call_status(first).state == "executed"
            return first, second

    first, second = asyncio.run(main())
    assert first != second
    entries = sorted(log.items)
    assert [(kind, x) for kind, x, _ in entries] == [("async", 2), ("plain", 1)]
    assert entries[0][2] == threading.current_thread().name  # async ran on the caller's loop
    assert entries[1][2].startswith("pmq-worker-")  # plain ran on a worker thread


def test_async_transaction_stores_its_calls(tmp_path: Path) -> None:
    """``async with cage.atransaction()`` stores its calls together and gives their ids after."""
    log = Log()

    class Mod:
        async def f(self, x: int) -> None:
            log.add(x)

    async def main() -> list[str]:
        async with pmq.Cage("solo", data_dir=tmp_path / "solo", expose={"mod": Mod()}) as cage:
            async with cage.atransaction() as xa:
                for x in range(5):
                    assert xa.on("loopback_queue").mod.f(x) is None
            await cage.adrain(timeout=LIMIT_S)
            return xa.call_ids

    ids = asyncio.run(main())
    assert len(set(ids)) == 5
    assert sorted(log.items) == list(range(5))


def test_blocking_execute_on_the_cages_own_loop_names_aexecute(tmp_path: Path) -> None:
    """The blocking execute on the loop an ``async with`` cage runs on raises RuntimeError."""

    async def main() -> None:
        async with pmq.Cage("solo", data_dir=tmp_path / "solo", expose={"mod": object()}) as cage:
            before = next_seq(cage)
            with pytest.raises(RuntimeError, match="aexecute"):
                cage.execute.on("loopback_queue").mod.f()
            assert next_seq(cage) == before

    asyncio.run(main())


# ---- inside a handler ------------------------------------------------------------------------


def test_current_call_describes_the_running_call(make_cage: Callable[..., pmq.Cage]) -> None:
    """current_call() gives call_id, user_id, attempt, source, queue, created and deadline."""
    log = Log()

    class Mod:
        def f(self) -> None:
            log.add(pmq.current_call())

    cage = make_cage(expose={"mod": Mod()})
    before = time.time()
    plain_id = cage.execute.on("loopback_queue").mod.f()
    user_id = cage.execute.on("loopback_queue", id="order/7", expires_in=600.0).mod.f()
    cage.drain(timeout=LIMIT_S)
    infos = {info.call_id: info for info in log.wait_for(2)}
    assert set(infos) == {plain_id, user_id} and user_id == "order/7"
    plain, named = infos[plain_id], infos[user_id]
    assert plain.user_id is None and named.user_id == "order/7"
    for info in (plain, named):
        assert isinstance(info, pmq.CallInfo)
        assert info.attempt == 1
        assert info.source == "solo" and info.queue == "loopback_queue"
        assert before - 1 <= info.created <= info.first_attempt
    assert plain.deadline is None
    assert named.deadline is not None
    assert named.deadline == pytest.approx(named.created + 600.0, abs=60.0)


def test_current_call_is_none_outside_a_handler() -> None:
    """Outside a handler current_call() is None."""
    assert pmq.current_call() is None


def test_async_handler_sees_its_current_call(make_cage: Callable[..., pmq.Cage]) -> None:
    """An ``async def`` handler gets its own call from current_call(), even when they overlap."""
    log = Log()
    both_started = threading.Barrier(2, timeout=LIMIT_S)

    class Mod:
        async def f(self, x: int) -> None:
            info = pmq.current_call()
            await asyncio.get_running_loop().run_in_executor(None, both_started.wait)
            log.add((x, info, pmq.current_call()))

    cage = make_cage(expose={"mod": Mod()})
    with cage.transaction() as xa:
        xa.on("loopback_queue").mod.f(0)
        xa.on("loopback_queue").mod.f(1)
    cage.drain(timeout=LIMIT_S)
    by_x = {x: (before, after) for x, before, after in log.items}
    for x, call_id in enumerate(xa.call_ids):
        before, after = by_x[x]
        assert before.call_id == call_id and after == before


def test_pmq_execute_in_a_handler_queues_a_further_call(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """pmq.execute inside a handler reaches the running cage and queues another call."""
    log = Log()

    class Mod:
        def first(self) -> None:
            child = pmq.execute.on("loopback_queue").mod.second(pmq.current_call().call_id)  # type: ignore[union-attr]
            log.add(("queued", child))

        def second(self, parent: str) -> None:
            log.add(("second", parent, pmq.current_call().call_id))  # type: ignore[union-attr]

    cage = make_cage(expose={"mod": Mod()})
    parent = cage.execute.on("loopback_queue").mod.first()
    cage.drain(timeout=LIMIT_S)
    queued, second = log.wait_for(2)
    assert queued[0] == "queued" and second == ("second", parent, queued[1])


def test_pmq_aexecute_in_an_async_handler_queues_a_further_call(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """``await pmq.aexecute`` inside an async handler queues another call."""
    log = Log()

    class Mod:
        async def first(self) -> None:
            log.add(await pmq.aexecute.on("loopback_queue").mod.second())

        def second(self) -> None:
            log.add(pmq.current_call().call_id)  # type: ignore[union-attr]

    cage = make_cage(expose={"mod": Mod()})
    cage.execute.on("loopback_queue").mod.first()
    cage.drain(timeout=LIMIT_S)
    queued, ran = log.wait_for(2)
    assert queued == ran


def test_id_in_a_handler_becomes_parent_id_colon_id_and_is_queued_once(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """id="step" in a handler becomes "<parent id>:step"; a retried handler queues it once."""
    log = Log()

    class Mod:
        def parent(self) -> None:
            info = pmq.current_call()
            assert info is not None
            log.add(("id", pmq.execute.on("loopback_queue", id="step").mod.step()))
            if info.attempt < 3:
                raise RuntimeError("fail after queueing the step, so the parent is retried")

        def step(self) -> None:
            log.add(("step", pmq.current_call().call_id))  # type: ignore[union-attr]

    cage = make_cage(expose={"mod": Mod()}, queues={"loopback_queue": FAST_RETRY})
    parent = cage.execute.on("loopback_queue").mod.parent()
    cage.drain(timeout=LIMIT_S)
    ids = [value for kind, value in log.items if kind == "id"]
    steps = [value for kind, value in log.items if kind == "step"]
    assert ids == [f"{parent}:step"] * 3
    assert steps == [f"{parent}:step"]  # three attempts queued it, it ran once


def test_pmq_execute_outside_a_handler_raises() -> None:
    """pmq.execute and pmq.aexecute outside a handler raise RuntimeError."""
    with pytest.raises(RuntimeError, match="inside a handler"):
        pmq.execute.on("loopback_queue").mod.f()

    async def main() -> None:
        await pmq.aexecute.on("loopback_queue").mod.f()

    with pytest.raises(RuntimeError, match="inside a handler"):
        asyncio.run(main())


def test_blocking_execute_in_an_async_handler_names_aexecute(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """In an async handler (on the cage's own loop) the blocking execute raises naming aexecute."""
    log = Log()

    class Mod:
        async def f(self) -> None:
            for proxy in (pmq.execute, cage.execute):
                try:
                    proxy.on("loopback_queue").mod.g()
                except RuntimeError as error:
                    log.add(str(error))

        def g(self) -> None:
            log.add("g ran")

    cage = make_cage(expose={"mod": Mod()})
    cage.execute.on("loopback_queue").mod.f()
    cage.drain(timeout=LIMIT_S)
    assert len(log.items) == 2
    assert all("aexecute" in message for message in log.items)


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "a b", "x" * 33, "billing_queue", "loopback", "é"])
def test_bad_cage_name_is_refused(tmp_path: Path, name: str) -> None:
    """A cage name outside [A-Za-z0-9_-]{1,32}, ending in _queue or reserved raises ValueError."""
    with pytest.raises(ValueError, match="cage name"):
        pmq.Cage(name, data_dir=tmp_path / "x")


def test_bad_peer_name_is_refused(tmp_path: Path) -> None:
    """A peer with an invalid cage name raises ValueError at construction."""
    with pytest.raises(ValueError, match="cage name"):
        pmq.Cage("solo", data_dir=tmp_path / "x", peers={"bad name": "127.0.0.1:7001"})


@pytest.mark.parametrize("name", ["_private", "__init__", "class", "1abc"])
def test_bad_module_name_cannot_be_exposed(make_cage: Callable[..., pmq.Cage], name: str) -> None:
    """expose() refuses a module name that is private, a keyword or not an identifier."""
    cage = make_cage(start=False)
    with pytest.raises(ValueError, match="module name"):
        cage.expose(name, object())


def test_private_module_or_method_cannot_be_called(make_cage: Callable[..., pmq.Cage]) -> None:
    """execute.on(...)._x and .mod._x are not calls (AttributeError); nothing is stored."""
    cage = make_cage(expose={"mod": object()})
    before = next_seq(cage)
    target = cage.execute.on("loopback_queue")
    with pytest.raises(AttributeError):
        target._private.f()
    with pytest.raises(AttributeError):
        target.mod._secret()
    with pytest.raises(ValueError, match="method name"):
        getattr(target.mod, "1abc")
    assert next_seq(cage) == before


def test_non_callable_attribute_of_an_exposed_object_is_not_exposed(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """Only callables run: a call naming a non-callable attribute is buried as not exposed."""
    log = Log()

    class Mod:
        limit = 5

        def f(self) -> None:
            log.add("f")

    cage = make_cage(expose={"mod": Mod()})
    call_id = cage.execute.on("loopback_queue").mod.limit()
    cage.drain(timeout=LIMIT_S)
    assert cage.call_status(call_id).reason == "not exposed"
    assert log.items == []


def test_private_method_never_runs_even_when_stored(make_cage: Callable[..., pmq.Cage]) -> None:
    """A stored call to a "_" method (as a peer could send) is buried "not exposed", never run."""
    log = Log()

    class Mod:
        def _secret(self) -> None:
            log.add("secret ran")

        def __call__(self) -> None:
            log.add("call ran")

    cage = make_cage(expose={"mod": Mod()})
    assert cage.store is not None
    calls = [NewCall("loopback_queue", False, "mod", method, pack_arguments((), {}), None, None,
                     "solo") for method in ("_secret", "__call__", "__init__")]
    ids, seq = cage.store.enqueue(calls)
    cage.store.journal.sync(seq)
    cage.execute.on("loopback_queue").mod.missing()  # wakes the dispatcher
    cage.drain(timeout=LIMIT_S)
    assert log.items == []
    reasons = {letter.call_id: letter.reason for letter in cage.dead_letters()}
    assert [reasons.get(call_id) for call_id in ids] == ["not exposed"] * 3


def test_unknown_peer_raises_naming_it(make_cage: Callable[..., pmq.Cage]) -> None:
    """A queued call to a cage that is not a peer raises ValueError naming it; nothing is stored."""
    cage = make_cage(peers={"ledger": "127.0.0.1:7002"})
    before = next_seq(cage)
    with pytest.raises(ValueError, match="unknown peer 'audit'") as caught:
        cage.execute.on("audit_queue").log.write("x")
    assert "ledger" in str(caught.value)
    assert next_seq(cage) == before


@pytest.mark.parametrize(
    ("args", "kwargs", "path"),
    [
        ((), {"when": object()}, "kwargs['when']"),
        ((1, {1, 2}), {}, "args[1]"),
        (([1, {"x": object()}],), {}, "args[0][1]['x']"),
    ],
)
def test_argument_that_cannot_travel_raises_type_error_naming_it(
    make_cage: Callable[..., pmq.Cage], args: tuple[Any, ...], kwargs: dict[str, Any], path: str
) -> None:
    """A non-serializable argument raises TypeError naming where it is; nothing is stored."""
    cage = make_cage(expose={"mod": object()})
    before = next_seq(cage)
    with pytest.raises(TypeError) as caught:
        cage.execute.on("loopback_queue").mod.f(*args, **kwargs)
    assert path in str(caught.value)
    assert next_seq(cage) == before


def test_oversize_arguments_raise_value_error(make_cage: Callable[..., pmq.Cage]) -> None:
    """Arguments over the journal's largest record raise ValueError naming the limit."""
    cage = make_cage(expose={"mod": object()}, segment_bytes=1 * MIB)
    assert cage.store is not None
    too_big = b"x" * cage.store.journal.max_payload_bytes
    before = next_seq(cage)
    with pytest.raises(ValueError, match="limit") as caught:
        cage.execute.on("loopback_queue").mod.f(too_big)
    assert "mod.f" in str(caught.value)
    with pytest.raises(ValueError, match="limit"), cage.transaction() as xa:
        xa.on("loopback_queue").mod.f(too_big)
    assert next_seq(cage) == before


def test_synchronous_target_raises_until_the_transport_exists(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """execute.on("ledger") (synchronous) raises ValueError suggesting "ledger_queue"."""
    cage = make_cage(peers={"ledger": "127.0.0.1:7002"}, expose={"mod": object()})
    before = next_seq(cage)
    with pytest.raises(ValueError, match="ledger_queue"):
        cage.execute.on("ledger", timeout=5.0).accounts.balance(42)
    with pytest.raises(ValueError, match="solo_queue"):
        cage.execute.on("solo").mod.f()
    assert next_seq(cage) == before


# ---- outcomes: retries, Retry, Reject, deadlines, dead letters -------------------------------


def test_failing_handler_is_retried_with_growing_attempt(
    make_cage: Callable[..., pmq.Cage], caplog: pytest.LogCaptureFixture
) -> None:
    """An exception is retried with backoff; current_call().attempt counts 1, 2, 3; then done."""
    log = Log()

    class Mod:
        def f(self) -> None:
            attempt = pmq.current_call().attempt  # type: ignore[union-attr]
            log.add(attempt)
            if attempt < 3:
                raise ValueError(f"failure {attempt}")

    cage = make_cage(expose={"mod": Mod()}, queues={"loopback_queue": FAST_RETRY})
    with caplog.at_level(logging.ERROR, logger="pmq"):
        call_id = cage.execute.on("loopback_queue").mod.f()
        cage.drain(timeout=LIMIT_S)
    assert log.items == [1, 2, 3]
    assert cage.call_status(call_id).state == "executed"
    assert cage.dead_letters() == []
    failures = [r for r in caplog.records
                if r.name == "pmq.dispatch" and r.levelno >= logging.ERROR]
    assert len(failures) == 2 and "failure 1" in failures[0].getMessage()


def test_retry_skips_the_attempt_quietly(
    make_cage: Callable[..., pmq.Cage], caplog: pytest.LogCaptureFixture
) -> None:
    """``raise pmq.Retry(after=0.01)`` runs the call again, attempt + 1, logging no error."""
    log = Log()

    class Mod:
        def f(self) -> None:
            attempt = pmq.current_call().attempt  # type: ignore[union-attr]
            log.add(attempt)
            if attempt < 3:
                raise pmq.Retry(after=0.01)

    cage = make_cage(expose={"mod": Mod()}, queues={"loopback_queue": {"retry_initial": 3600.0,
                                                                         "retry_max": 3600.0}})
    with caplog.at_level(logging.DEBUG, logger="pmq"):
        cage.execute.on("loopback_queue").mod.f()
        cage.drain(timeout=LIMIT_S)  # after= overrides the hour-long backoff
    assert log.items == [1, 2, 3]
    assert not [r for r in caplog.records
                if r.name.startswith("pmq") and r.levelno >= logging.WARNING]
    assert cage.stats()["dispatch"]["retried"] == 2


def test_retry_counts_against_max_attempts(make_cage: Callable[..., pmq.Cage]) -> None:
    """Retry counts as an attempt (docs/decisions.md): max_attempts still bounds it."""
    log = Log()

    class Mod:
        def f(self) -> None:
            log.add(pmq.current_call().attempt)  # type: ignore[union-attr]
            raise pmq.Retry(after=0)

    cage = make_cage(expose={"mod": Mod()}, queues={"loopback_queue": {"max_attempts": 2}})
    call_id = cage.execute.on("loopback_queue").mod.f()
    cage.drain(timeout=LIMIT_S)
    assert log.items == [1, 2]
    assert cage.call_status(call_id) == pmq.CallStatus("dead", "max attempts", 2)


def test_reject_sends_the_call_to_the_dead_letters(make_cage: Callable[..., pmq.Cage]) -> None:
    """``raise pmq.Reject("why")`` buries the call at once with reason "rejected" and the why."""
    log = Log()

    class Mod:
        def f(self, x: int) -> None:
            log.add(x)
            raise pmq.Reject("account 42 is closed")

    cage = make_cage(expose={"mod": Mod()}, queues={"loopback_queue": FAST_RETRY})
    call_id = cage.execute.on("loopback_queue").mod.f(42)
    cage.drain(timeout=LIMIT_S)
    assert log.items == [42]  # not retried
    [letter] = cage.dead_letters()
    assert isinstance(letter, pmq.DeadLetter)
    assert (letter.call_id, letter.queue, letter.module, letter.method) == (
        call_id, "loopback_queue", "mod", "f")
    assert letter.reason == "rejected" and letter.detail == "account 42 is closed"
    assert letter.attempts == 1
    assert cage.call_status(call_id) == pmq.CallStatus("dead", "rejected", 1)


@pytest.mark.parametrize("what", ["module", "method"])
def test_call_to_something_not_exposed_is_buried(
    make_cage: Callable[..., pmq.Cage], what: str
) -> None:
    """A call to a module or method the cage does not expose goes to dead letters "not exposed"."""

    class Mod:
        def f(self) -> None:
            pass

    cage = make_cage(expose={"mod": Mod()})
    target = cage.execute.on("loopback_queue")
    call_id = target.nomod.f() if what == "module" else target.mod.nomethod()
    cage.drain(timeout=LIMIT_S)
    [letter] = cage.dead_letters()
    assert letter.call_id == call_id and letter.reason == "not exposed"
    assert "not exposed" in letter.detail
    assert cage.call_status(call_id).reason == "not exposed"


def test_call_whose_deadline_passes_is_buried_expired(
    make_cage: Callable[..., pmq.Cage], caplog: pytest.LogCaptureFixture
) -> None:
    """A call with expires_in whose handler always fails goes to dead letters "expired", logged."""
    log = Log()

    class Mod:
        def f(self) -> None:
            log.add(pmq.current_call().attempt)  # type: ignore[union-attr]
            raise RuntimeError("never works")

    cage = make_cage(expose={"mod": Mod()}, queues={"loopback_queue": FAST_RETRY})
    with caplog.at_level(logging.WARNING, logger="pmq"):
        call_id = cage.execute.on("loopback_queue", expires_in=0.3).mod.f()
        cage.drain(timeout=LIMIT_S)
    assert cage.call_status(call_id).state == "dead"
    [letter] = cage.dead_letters()
    assert letter.reason == "expired"
    assert letter.attempts == len(log.items)
    assert any("expired" in r.getMessage() and call_id in r.getMessage() for r in caplog.records)


def test_max_attempts_buries_after_exactly_that_many(make_cage: Callable[..., pmq.Cage]) -> None:
    """With max_attempts=3 a failing call runs exactly 3 times, then is dead "max attempts"."""
    log = Log()

    class Mod:
        def f(self) -> None:
            log.add(pmq.current_call().attempt)  # type: ignore[union-attr]
            raise KeyError("missing")

    cage = make_cage(expose={"mod": Mod()},
                     queues={"loopback_queue": {**FAST_RETRY, "max_attempts": 3}})
    call_id = cage.execute.on("loopback_queue").mod.f()
    cage.drain(timeout=LIMIT_S)
    assert log.items == [1, 2, 3]
    [letter] = cage.dead_letters()
    assert letter.reason == "max attempts" and letter.attempts == 3
    assert "KeyError" in letter.detail
    assert cage.call_status(call_id) == pmq.CallStatus("dead", "max attempts", 3)


def test_replay_runs_a_dead_letter_again_with_attempts_reset(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """replay(call_id) sends a dead letter back to its queue; it runs again from attempt 1."""
    log = Log()
    broken = True

    class Mod:
        def f(self, x: int) -> None:
            log.add((x, pmq.current_call().attempt))  # type: ignore[union-attr]
            if broken:
                raise RuntimeError("broken")

    cage = make_cage(expose={"mod": Mod()},
                     queues={"loopback_queue": {**FAST_RETRY, "max_attempts": 2}})
    call_id = cage.execute.on("loopback_queue").mod.f(7)
    cage.drain(timeout=LIMIT_S)
    assert cage.call_status(call_id).state == "dead"
    broken = False
    cage.replay(call_id)
    cage.drain(timeout=LIMIT_S)
    assert log.items == [(7, 1), (7, 2), (7, 1)]
    assert cage.dead_letters() == []
    assert cage.call_status(call_id).state == "executed"
    assert cage.stats()["counters"]["revived"] == 1


def test_purge_deletes_a_dead_letter_for_good(
    make_cage: Callable[..., pmq.Cage], tmp_path: Path
) -> None:
    """purge(call_id) removes a dead letter for good (also after a restart); status is unknown."""
    log = Log()

    class Mod:
        def f(self) -> None:
            log.add(pmq.current_call().call_id)  # type: ignore[union-attr]
            raise pmq.Reject("no")

    cage = make_cage(expose={"mod": Mod()})
    auto_id = cage.execute.on("loopback_queue").mod.f()
    user_id = cage.execute.on("loopback_queue", id="drop-me").mod.f()
    cage.drain(timeout=LIMIT_S)
    assert {letter.call_id for letter in cage.dead_letters()} == {auto_id, user_id}
    cage.purge(auto_id)
    assert [letter.call_id for letter in cage.dead_letters()] == [user_id]
    assert cage.call_status(auto_id).state == "unknown"
    cage.purge(user_id)
    assert cage.dead_letters() == []
    for call_id in (auto_id, user_id):
        with pytest.raises(KeyError):
            cage.replay(call_id)
        with pytest.raises(KeyError):
            cage.purge(call_id)
    cage.stop()
    again = make_cage(data_dir=tmp_path / "solo", expose={"mod": Mod()})
    again.drain(timeout=LIMIT_S)
    assert again.dead_letters() == []
    assert sorted(log.items) == sorted([auto_id, user_id])  # neither ran again
    assert again.call_status(auto_id).state == "unknown"  # (user ids: the test below)


def test_status_of_a_purged_call_with_a_user_id_is_unknown(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """A purged dead letter made with id= is "unknown", not "executed": it never ran to success."""

    class Mod:
        def f(self) -> None:
            raise pmq.Reject("no")

    cage = make_cage(expose={"mod": Mod()})
    call_id = cage.execute.on("loopback_queue", id="drop-me").mod.f()
    cage.drain(timeout=LIMIT_S)
    cage.purge(call_id)
    assert cage.call_status(call_id).state == "unknown"


def test_replay_or_purge_of_a_call_that_is_not_dead_raises_key_error(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """replay and purge of an unknown or completed call raise KeyError."""

    class Mod:
        def f(self) -> None:
            pass

    cage = make_cage(expose={"mod": Mod()})
    done = cage.execute.on("loopback_queue").mod.f()
    cage.drain(timeout=LIMIT_S)
    for call_id in (done, "solo:00000000:999", "never-made"):
        with pytest.raises(KeyError):
            cage.replay(call_id)
        with pytest.raises(KeyError):
            cage.purge(call_id)


def test_call_status_follows_a_call(make_cage: Callable[..., pmq.Cage]) -> None:
    """call_status: accepted while pending or running, executed after, dead, unknown, stored."""
    release = threading.Event()
    running = threading.Event()

    class Mod:
        def hold(self) -> None:
            running.set()
            assert release.wait(LIMIT_S)

        def quick(self) -> None:
            pass

        def refuse(self) -> None:
            raise pmq.Reject("refused")

    cage = make_cage(expose={"mod": Mod()}, peers={"ledger": "127.0.0.1:1"},
                     queues={"loopback_queue": {"ordered": True}})
    held = cage.execute.on("loopback_queue").mod.hold()
    behind = cage.execute.on("loopback_queue").mod.quick()
    assert running.wait(LIMIT_S)
    assert cage.call_status(held).state == "accepted"  # running
    assert cage.call_status(behind) == pmq.CallStatus("accepted", None, 0)  # waiting
    outbound = cage.execute.on("ledger_queue").accounts.credit(1)
    assert cage.call_status(outbound).state == "stored"  # waits for the transport
    release.set()
    refused = cage.execute.on("loopback_queue").mod.refuse()
    wait_until(lambda: cage.store is not None and cage.store.pending("loopback_queue") == 0,
               "the loopback queue drains")
    assert cage.call_status(held).state == "executed"
    assert cage.call_status(behind).state == "executed"
    assert cage.call_status(refused) == pmq.CallStatus("dead", "rejected", 1)
    assert cage.call_status("solo:00000000:1").state == "unknown"
    assert cage.call_status("no-such-id").state == "unknown"


def test_dead_letters_survive_a_restart(make_cage: Callable[..., pmq.Cage], tmp_path: Path) -> None:
    """Dead letters (reason, detail, attempts) are the same after stop and start; replay works."""
    log = Log()

    class Mod:
        def f(self) -> None:
            log.add(pmq.current_call().attempt)  # type: ignore[union-attr]
            raise pmq.Reject("later")

    cage = make_cage(expose={"mod": Mod()})
    call_id = cage.execute.on("loopback_queue").mod.f()
    cage.drain(timeout=LIMIT_S)
    letters = cage.dead_letters()
    cage.stop()

    class Fixed:
        def f(self) -> None:
            log.add(("fixed", pmq.current_call().attempt))  # type: ignore[union-attr]

    again = make_cage(data_dir=tmp_path / "solo", expose={"mod": Fixed()})
    assert again.dead_letters() == letters
    again.replay(call_id)
    again.drain(timeout=LIMIT_S)
    assert log.items == [1, ("fixed", 1)]
    assert again.dead_letters() == []


# ---- transactions ----------------------------------------------------------------------------


def test_transaction_stores_its_calls_together_and_gives_ids_after(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """Calls in a transaction return None; xa.call_ids holds their ids in order; all of them run."""
    log = Log()

    class Mod:
        def f(self, x: int) -> None:
            log.add((x, pmq.current_call().call_id))  # type: ignore[union-attr]

    cage = make_cage(expose={"mod": Mod()})
    before = next_seq(cage)
    with cage.transaction() as xa:
        results = [xa.on("loopback_queue").mod.f(x) for x in range(4)]
        results.append(xa.on("loopback_queue", id="named").mod.f(4))
        assert xa.call_ids == []
    assert results == [None] * 5
    assert len(xa.call_ids) == 5 and xa.call_ids[4] == "named"
    assert next_seq(cage) == before + 5  # one record per call, nothing else yet
    cage.drain(timeout=LIMIT_S)
    assert sorted(log.items) == [(x, xa.call_ids[x]) for x in range(5)]


def test_transaction_that_raises_stores_nothing(make_cage: Callable[..., pmq.Cage]) -> None:
    """A block that raises stores none of its calls: none runs and the journal is unchanged."""
    log = Log()

    class Mod:
        def f(self, x: int) -> None:
            log.add(x)

    cage = make_cage(expose={"mod": Mod()})
    before = next_seq(cage)
    with pytest.raises(ZeroDivisionError), cage.transaction() as xa:
        xa.on("loopback_queue").mod.f(1)
        xa.on("loopback_queue").mod.f(2)
        1 / 0  # noqa: B018
    with pytest.raises(TypeError, match="args\\[0\\]"), cage.transaction() as xa2:
        xa2.on("loopback_queue").mod.f(3)
        xa2.on("loopback_queue").mod.f(object())
    assert next_seq(cage) == before
    assert xa.call_ids == [] and xa2.call_ids == []
    cage.execute.on("loopback_queue").mod.f(4)  # a marker: once it ran, nothing else will
    cage.drain(timeout=LIMIT_S)
    assert log.items == [4]
    assert cage.stats()["counters"]["enqueued"] == 1


def test_empty_transaction_stores_nothing(make_cage: Callable[..., pmq.Cage]) -> None:
    """A transaction with no calls writes nothing and has no ids."""
    cage = make_cage()
    before = next_seq(cage)
    with cage.transaction() as xa:
        pass
    assert xa.call_ids == [] and next_seq(cage) == before


def test_transaction_of_1000_calls_costs_one_fsync(make_cage: Callable[..., pmq.Cage]) -> None:
    """1,000 queued calls in one transaction are one journal frame and one fsync."""
    # The calls go to a peer's outbound queue: with no transport nothing takes them, so no
    # ATTEMPT record (which the dispatcher fsyncs) can slip in between the block and the count.
    cage = make_cage(peers={"ledger": "127.0.0.1:1"})
    assert cage.store is not None
    journal = cage.store.journal
    before = journal.stats()
    with cage.transaction() as xa:
        for n in range(1000):
            xa.on("ledger_queue").accounts.credit(n, amount=n)
    after = journal.stats()
    assert len(xa.call_ids) == 1000
    assert after["fsyncs"] - before["fsyncs"] == 1
    assert after["frames"] - before["frames"] == 1
    assert after["records"] - before["records"] == 1000
    assert cage.store.pending("ledger_queue", outbound=True) == 1000


def test_async_transaction_of_1000_loopback_calls_costs_one_fsync(tmp_path: Path) -> None:
    """1,000 loopback calls in one ``async with atransaction()``: one frame, one fsync, all run."""
    # The cage runs on this loop and its dispatcher is idle (a first call has run), so nothing
    # wakes it while the block's commit is awaited, and the counters are read without an await
    # after the block: no ATTEMPT record (which the dispatcher fsyncs) can slip in.
    log = Log()

    class Mod:
        def f(self, n: int) -> None:
            log.add(n)

    async def main() -> tuple[dict[str, float], dict[str, float], list[str]]:
        async with pmq.Cage("solo", data_dir=tmp_path / "solo", expose={"mod": Mod()}) as cage:
            assert cage.store is not None
            journal = cage.store.journal
            await cage.aexecute.on("loopback_queue").mod.f(-1)  # the dispatcher is running...
            await cage.adrain(timeout=LIMIT_S)  # ...and idle
            await journal.sync_async()  # its DONE record is written, not left for our batch
            before = journal.stats()
            async with cage.atransaction() as xa:
                for n in range(1000):
                    xa.on("loopback_queue").mod.f(n)
            after = journal.stats()  # no await since the block ended
            await cage.adrain(timeout=LIMIT_S)
            return before, after, xa.call_ids

    before, after, ids = asyncio.run(main())
    assert after["fsyncs"] - before["fsyncs"] == 1
    assert after["frames"] - before["frames"] == 1
    assert len(set(ids)) == 1000
    assert sorted(log.items) == list(range(-1, 1000))


def test_transaction_over_max_pending_stores_nothing(make_cage: Callable[..., pmq.Cage]) -> None:
    """A transaction that would overfill an outbound queue raises QueueFull and stores none."""
    cage = make_cage(peers={"ledger": "127.0.0.1:1"},
                     queues={"ledger_queue": {"max_pending": 5}})
    before = next_seq(cage)
    with pytest.raises(pmq.QueueFull), cage.transaction() as xa:
        for n in range(6):
            xa.on("ledger_queue").accounts.credit(n)
    assert next_seq(cage) == before and xa.call_ids == []
    assert cage.store is not None and cage.store.pending("ledger_queue", outbound=True) == 0


# ---- user ids --------------------------------------------------------------------------------


def test_same_user_id_twice_runs_once(make_cage: Callable[..., pmq.Cage]) -> None:
    """A second call with the same id= from the same cage returns the id and is not stored."""
    log = Log()

    class Mod:
        def f(self, x: int) -> None:
            log.add(x)

    cage = make_cage(expose={"mod": Mod()})
    first = cage.execute.on("loopback_queue", id="transfer/123").mod.f(1)
    cage.drain(timeout=LIMIT_S)
    before = next_seq(cage)
    second = cage.execute.on("loopback_queue", id="transfer/123").mod.f(2)
    assert first == second == "transfer/123"
    assert next_seq(cage) == before
    with cage.transaction() as xa:
        xa.on("loopback_queue", id="pair").mod.f(3)
        xa.on("loopback_queue", id="pair").mod.f(4)
        xa.on("loopback_queue", id="transfer/123").mod.f(5)
    assert xa.call_ids == ["pair", "pair", "transfer/123"]
    cage.drain(timeout=LIMIT_S)
    assert log.items == [1, 3]
    assert cage.stats()["counters"]["duplicates"] == 3
    assert cage.call_status("transfer/123").state == "executed"


def test_same_user_id_runs_once_across_a_restart(
    make_cage: Callable[..., pmq.Cage], tmp_path: Path
) -> None:
    """A user id is remembered across stop and start: the repeated call is not stored again."""
    log = Log()

    class Mod:
        def f(self, x: int) -> None:
            log.add(x)

    cage = make_cage(expose={"mod": Mod()})
    cage.execute.on("loopback_queue", id="once").mod.f(1)
    cage.drain(timeout=LIMIT_S)
    cage.stop()
    again = make_cage(data_dir=tmp_path / "solo", expose={"mod": Mod()})
    before = next_seq(again)
    assert again.execute.on("loopback_queue", id="once").mod.f(2) == "once"
    assert next_seq(again) == before
    assert again.call_status("once").state == "executed"
    again.drain(timeout=LIMIT_S)
    assert log.items == [1]


def test_user_id_is_forgotten_after_the_retention_window(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """Past ``retention`` seconds the same id is a new call again."""
    log = Log()

    class Mod:
        def f(self, x: int) -> None:
            log.add(x)

    cage = make_cage(expose={"mod": Mod()}, retention=0.05)
    cage.execute.on("loopback_queue", id="short").mod.f(1)
    cage.drain(timeout=LIMIT_S)
    time.sleep(0.1)  # let the window pass (not a timing assertion: only a lower bound)
    cage.execute.on("loopback_queue", id="short").mod.f(2)
    cage.drain(timeout=LIMIT_S)
    assert log.items == [1, 2]


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
