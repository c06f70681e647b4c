"""The local cage: lifecycle, handlers and bad input.

Runs one cage on a data directory under ``tmp_path`` (real disk) and checks DESIGN.md §1 as
cage.py implements it. The conventions shared by every cage test file (no timing assertions,
waiting through ``cage.drain`` or Events) are in tests/helpers.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import pmq
from helpers import FAST_RETRY, LIMIT_S, MIB, Log, next_seq
from pmq._calls import NewCall
from pmq._codec import pack_arguments

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


def test_synchronous_calls_to_itself_or_unknown_peers_raise_value_error(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """execute.on("<self>") and execute.on("<unknown peer>") raise ValueError and store nothing."""
    cage = make_cage(expose={"mod": object()})
    before = next_seq(cage)
    with pytest.raises(ValueError, match="loopback_queue"):
        cage.execute.on("solo").mod.f()
    with pytest.raises(ValueError, match="unknown peer 'ledger'"):
        cage.execute.on("ledger", timeout=5.0).accounts.balance(42)
    assert next_seq(cage) == before
