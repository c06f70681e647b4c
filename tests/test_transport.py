"""Cage to cage: queued calls and synchronous RPC over TCP, TLS and the handshake's checks.

Checks DESIGN.md §1, §2 and §5 as cage.py, transport.py and the store's "between cages" part
implement them, with real cages on 127.0.0.1: in this process (several ``make_cage`` cages) and
in child processes (tests/cage_peer.py, which records every execution in an fsynced file).

Conventions (tests/helpers.py): data directories under ``tmp_path`` on the real disk, nothing
asserts on time, every wait is ``drain``, ``Log.wait_for`` or ``wait_until`` with ``LIMIT_S``.
A "free port" is one the kernel just gave out and nothing listens on: connecting to it is
refused, which is what a peer that is down looks like.

A few tests reach inside a cage (``cage.store``, ``cage.transport``) to make a rare moment
certain: an acknowledgement the sender loses, or an fsync that takes its time. Each says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pmq
from helpers import LIMIT_S, Log, next_seq, wait_until
from pmq import protocol
from pmq._codec import pack_arguments

MakeCage = Callable[..., pmq.Cage]

PEER_SCRIPT = Path(__file__).with_name("cage_peer.py")
#: A synchronous call that is meant to fail fast (nobody listens, or the handler never answers).
SHORT_S = 0.5


# ---- helpers ----------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (the kernel just handed it out)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local(port: int) -> str:
    """``"127.0.0.1:port"``."""
    return f"127.0.0.1:{port}"


def at(cage: pmq.Cage) -> str:
    """The "host:port" a started cage listens on."""
    assert cage.address is not None, f"{cage!r} does not listen"
    return f"{cage.address[0]}:{cage.address[1]}"


class Accounts:
    """The module most tests expose: each credit is logged with the call's id, source and queue."""

    def __init__(self) -> None:
        self.log = Log()
        self._lock = threading.Lock()
        self._balances: dict[int, int] = {}

    def credit(self, account: int, *, amount: int) -> None:
        """Add `amount` to `account` and log (call id, source, queue, account, amount)."""
        info = pmq.current_call()
        assert info is not None
        with self._lock:
            self._balances[account] = self._balances.get(account, 0) + amount
        self.log.add((info.call_id, info.source, info.queue, account, amount))

    def balance(self, account: int) -> int:
        """The sum of the credits `account` got."""
        with self._lock:
            return self._balances.get(account, 0)

    def ids(self) -> Counter[str]:
        """How often each call id ran."""
        return Counter(item[0] for item in self.log.items)


class Overdrawn(Exception):
    """A user exception that a handler raises, to see its qualified name arrive."""


class Service:
    """A module for synchronous calls: values back, exceptions, a handler that waits."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def echo(self, value: Any) -> Any:
        """Return `value` unchanged."""
        return value

    async def aecho(self, value: Any) -> Any:
        """Return `value` from a coroutine handler."""
        await asyncio.sleep(0)
        return value

    def caller(self) -> list[Any]:
        """Who the call came from, as the handler sees it."""
        info = pmq.current_call()
        assert info is not None
        return [info.source, info.attempt]

    def lookup(self, key: str) -> Any:
        """Raise KeyError for every key."""
        table: dict[str, Any] = {}
        return table[key]

    def overdraw(self, account: int) -> None:
        """Raise a user-defined exception."""
        raise Overdrawn(f"account {account} is short by 5")

    def wait(self) -> str:
        """Answer only once the test opens the gate."""
        self.waiting.set()
        self.gate.wait(LIMIT_S)
        return "late"


def records(caplog: pytest.LogCaptureFixture, start: str, *parts: str) -> list[str]:
    """Messages of pmq.transport that begin with `start` and contain every one of `parts`."""
    found = []
    for record in list(caplog.records):
        if record.name != "pmq.transport":
            continue
        message = record.getMessage()
        if message.startswith(start) and all(part in message for part in parts):
            found.append(message)
    return found


def nothing_accepted(cage: pmq.Cage, seq_before: int) -> None:
    """Assert that `cage` stored nothing from a peer since its journal's next seq was noted."""
    assert cage.store is not None
    assert next_seq(cage) == seq_before
    assert not any(name.endswith("_queue") and name != "loopback_queue"
                   for name in cage.store.queue_names())
    counters = cage.stats()["counters"]
    assert counters["accepted"] == 0 and counters["refused"] == 0


def serving(make_cage: MakeCage, name: str = "b", **kwargs: Any) -> tuple[pmq.Cage, Service]:
    """A started cage exposing a Service as ``svc``, listening on a port of its own."""
    service = Service()
    kwargs.setdefault("listen", "127.0.0.1:0")
    return make_cage(name, expose={"svc": service}, **kwargs), service


# ---- two cages in one process -----------------------------------------------------------------


def test_queued_loopback_and_rpc_calls_flow_both_ways_between_two_cages(
    make_cage: MakeCage,
) -> None:
    """Queued, loopback, transaction and RPC calls both ways: each queued call runs once."""
    port_a, port_b = free_port(), free_port()
    acc_a, acc_b = Accounts(), Accounts()
    a = make_cage("a", listen=local(port_a), peers={"b": local(port_b)},
                  expose={"accounts": acc_a})
    b = make_cage("b", listen=local(port_b), peers={"a": local(port_a)},
                  expose={"accounts": acc_b})

    a_to_b = [a.execute.on("b_queue").accounts.credit(i % 3, amount=1) for i in range(30)]
    a_local = [a.execute.on("loopback_queue").accounts.credit(7, amount=1) for _ in range(10)]
    b_to_a = [b.execute.on("a_queue").accounts.credit(5, amount=2) for _ in range(20)]
    b_local = [b.execute.on("loopback_queue").accounts.credit(6, amount=1) for _ in range(5)]
    with a.transaction() as xa:
        for _ in range(5):
            xa.on("b_queue").accounts.credit(9, amount=10)
        xa.on("loopback_queue").accounts.credit(8, amount=100)
    a_to_b += xa.call_ids[:5]
    a_local.append(xa.call_ids[5])

    acc_b.log.wait_for(len(a_to_b) + len(b_local))
    acc_a.log.wait_for(len(b_to_a) + len(a_local))
    a.drain(timeout=LIMIT_S)
    b.drain(timeout=LIMIT_S)

    assert acc_b.ids() == Counter(a_to_b + b_local)
    assert acc_a.ids() == Counter(b_to_a + a_local)
    for call_id, source, queue, *_ in acc_b.log.items:
        expected = ("a", "a_queue") if call_id in a_to_b else ("b", "loopback_queue")
        assert (source, queue) == expected, call_id
    for call_id, source, queue, *_ in acc_a.log.items:
        expected = ("b", "b_queue") if call_id in b_to_a else ("a", "loopback_queue")
        assert (source, queue) == expected, call_id
    assert {a.call_status(i).state for i in a_to_b} == {"transmitted"}
    assert {a.call_status(i).state for i in a_local} == {"executed"}
    assert {b.call_status(i).state for i in b_to_a} == {"transmitted"}

    assert a.execute.on("b", timeout=LIMIT_S).accounts.balance(9) == 50
    assert a.execute.on("b", timeout=LIMIT_S).accounts.balance(0) == 10
    assert b.execute.on("a", timeout=LIMIT_S).accounts.balance(5) == 40
    assert b.execute.on("a", timeout=LIMIT_S).accounts.balance(8) == 100


def test_calls_made_from_many_threads_at_once_are_all_sent_and_run_without_a_keepalive(
    make_cage: MakeCage, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Threads making calls to a peer and to the cage itself at the same time: each call wakes
    the part that handles it, or rides a wake-up already on its way (they coalesce), and none is
    left waiting for the link's keepalive or for an idle connection to be dropped and made again
    (both pushed out of the test's reach here)."""
    from pmq import transport

    monkeypatch.setattr(transport, "KEEPALIVE_S", 10 * LIMIT_S)
    monkeypatch.setattr(transport, "IDLE_TIMEOUT_S", 10 * LIMIT_S)
    acc_a, acc_b = Accounts(), Accounts()
    b = make_cage("b", listen="127.0.0.1:0", expose={"accounts": acc_b})
    a = make_cage("a", peers={"b": at(b)}, expose={"accounts": acc_a})
    threads_n, per_thread = 24, 25
    start = threading.Barrier(threads_n)
    made: dict[str, list[str]] = {"b_queue": [], "loopback_queue": []}
    errors: list[BaseException] = []

    def make(t: int) -> None:
        queue = "loopback_queue" if t % 4 == 0 else "b_queue"
        try:
            start.wait()
            ids = [a.execute.on(queue).accounts.credit(t, amount=i) for i in range(per_thread)]
            made[queue].extend(ids)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    workers = [threading.Thread(target=make, args=(t,)) for t in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(LIMIT_S)
    assert errors == []
    acc_b.log.wait_for(len(made["b_queue"]))
    acc_a.log.wait_for(len(made["loopback_queue"]))
    a.drain(timeout=LIMIT_S)
    b.drain(timeout=LIMIT_S)
    assert acc_b.ids() == Counter(made["b_queue"])
    assert acc_a.ids() == Counter(made["loopback_queue"])


def test_a_handler_reaches_a_peer_through_pmq_execute(make_cage: MakeCage) -> None:
    """pmq.execute in a handler makes RPCs and queued calls to a peer; id= gets the parent's id."""
    acc_b = Accounts()
    b = make_cage("b", listen="127.0.0.1:0", expose={"accounts": acc_b, "svc": Service()})
    answers = Log()

    class Relay:
        def forward(self, value: int) -> None:
            answer = pmq.execute.on("b", timeout=LIMIT_S).svc.echo([value])
            pmq.execute.on("b_queue", id="credit").accounts.credit(value, amount=value)
            answers.add(answer)

    a = make_cage("a", peers={"b": at(b)}, expose={"relay": Relay()})
    parent = a.execute.on("loopback_queue").relay.forward(4)
    assert answers.wait_for(1) == [[4]]
    acc_b.log.wait_for(1)
    a.drain(timeout=LIMIT_S)
    b.drain(timeout=LIMIT_S)
    assert acc_b.log.items == [(f"{parent}:credit", "a", "a_queue", 4, 4)]


def test_a_peer_given_several_addresses_is_reached_at_the_one_that_answers(
    make_cage: MakeCage,
) -> None:
    """peers={"b": [refusing address, b's address]}: queued calls and RPC reach b."""
    acc = Accounts()
    b = make_cage("b", listen="127.0.0.1:0", expose={"accounts": acc})
    a = make_cage("a", peers={"b": [local(free_port()), at(b)]})
    ids = [a.execute.on("b_queue").accounts.credit(1, amount=1) for _ in range(10)]
    a.drain(timeout=LIMIT_S)
    acc.log.wait_for(len(ids))
    b.drain(timeout=LIMIT_S)
    assert acc.ids() == Counter(ids)
    assert a.execute.on("b", timeout=LIMIT_S).accounts.balance(1) == 10


# ---- restarts ---------------------------------------------------------------------------------


def test_calls_pending_while_the_receiver_restarts_arrive_once_each(
    make_cage: MakeCage, tmp_path: Path,
) -> None:
    """b restarts (same directory and port) while a's calls wait for it: each runs on b once."""
    acc = Accounts()
    b = make_cage("b", listen="127.0.0.1:0", expose={"accounts": acc})
    port = b.address[1] if b.address else 0
    a = make_cage("a", peers={"b": local(port)})
    first = [a.execute.on("b_queue").accounts.credit(1, amount=1) for _ in range(100)]
    acc.log.wait_for(10)
    b.stop()
    second = [a.execute.on("b_queue").accounts.credit(2, amount=1) for _ in range(50)]
    assert a.call_status(second[-1]).state == "stored"

    b = make_cage("b", data_dir=tmp_path / "b", listen=local(port), expose={"accounts": acc})
    a.drain(timeout=LIMIT_S)
    acc.log.wait_for(len(first) + len(second))
    b.drain(timeout=LIMIT_S)
    assert acc.ids() == Counter(first + second)
    assert {a.call_status(i).state for i in first + second} == {"transmitted"}


def test_a_restarted_sender_redelivers_unacknowledged_calls_and_the_receiver_drops_the_copies(
    make_cage: MakeCage, tmp_path: Path,
) -> None:
    """A sender that lost b's acknowledgements resends after a restart; b accepts nothing twice."""
    # Reaches inside: a's store drops every acknowledgement (settle_outbound does nothing), the
    # state of a sender that crashed between b's ACK and its own record of it.
    acc = Accounts()
    b = make_cage("b", listen="127.0.0.1:0", expose={"accounts": acc})
    a = make_cage("a", peers={"b": at(b)})
    assert a.store is not None
    a.store.settle_outbound = lambda *args: 0  # type: ignore[method-assign]
    ids = [a.execute.on("b_queue").accounts.credit(1, amount=1) for _ in range(40)]
    acc.log.wait_for(len(ids))
    b.drain(timeout=LIMIT_S)
    assert {a.call_status(i).state for i in ids} == {"stored"}
    a.stop()

    a = make_cage("a", data_dir=tmp_path / "a", peers={"b": at(b)})
    a.drain(timeout=LIMIT_S)
    b.drain(timeout=LIMIT_S)
    assert acc.ids() == Counter(ids)
    assert b.stats()["counters"]["accepted"] == len(ids)
    assert {a.call_status(i).state for i in ids} == {"transmitted"}


def test_a_sender_started_again_from_an_empty_directory_is_not_taken_for_a_replay(
    make_cage: MakeCage, tmp_path: Path,
) -> None:
    """A sender restarted on an empty directory (a new journal) gets its new calls accepted."""
    acc = Accounts()
    b = make_cage("b", listen="127.0.0.1:0", expose={"accounts": acc})
    a = make_cage("a", peers={"b": at(b)})
    old = [a.execute.on("b_queue").accounts.credit(1, amount=1) for _ in range(5)]
    a.drain(timeout=LIMIT_S)
    a.stop()
    shutil.rmtree(tmp_path / "a")

    a = make_cage("a", data_dir=tmp_path / "a", peers={"b": at(b)})
    new = [a.execute.on("b_queue").accounts.credit(2, amount=1) for _ in range(5)]
    assert not set(old) & set(new)
    a.drain(timeout=LIMIT_S)
    acc.log.wait_for(10)
    b.drain(timeout=LIMIT_S)
    assert acc.ids() == Counter(old + new)


def test_two_copies_of_a_cage_share_their_user_ids_at_the_target(
    make_cage: MakeCage, tmp_path: Path,
) -> None:
    """Two cages named a send the same id= to b: b runs it once, the second is a duplicate."""
    acc = Accounts()
    b = make_cage("b", listen="127.0.0.1:0", expose={"accounts": acc})
    first = make_cage("a", data_dir=tmp_path / "a1", peers={"b": at(b)})
    second = make_cage("a", data_dir=tmp_path / "a2", peers={"b": at(b)})
    id1 = first.execute.on("b_queue", id="transfer/1").accounts.credit(1, amount=5)
    first.drain(timeout=LIMIT_S)
    acc.log.wait_for(1)
    id2 = second.execute.on("b_queue", id="transfer/1").accounts.credit(1, amount=5)
    second.drain(timeout=LIMIT_S)
    b.drain(timeout=LIMIT_S)
    assert id1 == id2 == "transfer/1"
    assert acc.log.items == [("transfer/1", "a", "a_queue", 1, 5)]
    assert b.stats()["counters"]["duplicates"] == 1
    assert second.call_status(id2).state == "transmitted"


# ---- authentication and names -----------------------------------------------------------------


def test_a_wrong_secret_is_refused_and_logged_by_both_ends_and_nothing_is_stored(
    make_cage: MakeCage, caplog: pytest.LogCaptureFixture,
) -> None:
    """Different secrets: both ends log 'wrong secret', b stores nothing, a's call stays stored."""
    caplog.set_level(logging.INFO, logger="pmq.transport")
    acc = Accounts()
    b = make_cage("b", listen="127.0.0.1:0", secret=b"the right one", expose={"accounts": acc})
    before = next_seq(b)
    a = make_cage("a", peers={"b": at(b)}, secret=b"a wrong one")
    call = a.execute.on("b_queue").accounts.credit(1, amount=1)

    wait_until(lambda: bool(records(caplog, "cage b dropped the connection", "wrong secret")),
               "the listener logs the wrong secret")
    wait_until(lambda: bool(records(caplog, "link a -> b", "wrong secret")),
               "the link logs the wrong secret")
    with pytest.raises(pmq.TransportError, match="secret"):
        a.execute.on("b", timeout=SHORT_S).accounts.balance(1)
    nothing_accepted(b, before)
    assert a.call_status(call).state == "stored"
    assert acc.log.items == []


@pytest.mark.parametrize(("a_secret", "b_secret", "listener_says", "link_says"), [
    (b"s3cret", None, "peer 'a' uses a secret, but this cage has none",
     "this cage uses a secret, but peer 'b' has none"),
    (None, b"s3cret", "this cage uses a secret, but peer 'a' has none",
     "peer 'b' uses a secret, but this cage has none"),
], ids=["sender-only", "receiver-only"])
def test_a_secret_on_one_side_only_is_refused_by_both_ends(
    make_cage: MakeCage, caplog: pytest.LogCaptureFixture, a_secret: bytes | None,
    b_secret: bytes | None, listener_says: str, link_says: str,
) -> None:
    """A secret on one side only: both ends refuse and say why; b stores nothing."""
    caplog.set_level(logging.INFO, logger="pmq.transport")
    b = make_cage("b", listen="127.0.0.1:0", secret=b_secret, expose={"accounts": Accounts()})
    before = next_seq(b)
    a = make_cage("a", peers={"b": at(b)}, secret=a_secret)
    call = a.execute.on("b_queue").accounts.credit(1, amount=1)
    wait_until(lambda: bool(records(caplog, "cage b dropped the connection", listener_says)),
               f"the listener logs {listener_says!r}")
    wait_until(lambda: bool(records(caplog, "link a -> b", link_says)),
               f"the link logs {link_says!r}")
    nothing_accepted(b, before)
    assert a.call_status(call).state == "stored"


def test_the_same_secret_on_both_sides_lets_calls_through(make_cage: MakeCage) -> None:
    """Equal secrets: the handshake completes and calls and RPC flow."""
    acc = Accounts()
    b = make_cage("b", listen="127.0.0.1:0", secret=b"shared", expose={"accounts": acc})
    a = make_cage("a", peers={"b": at(b)}, secret=b"shared")
    call = a.execute.on("b_queue").accounts.credit(3, amount=3)
    a.drain(timeout=LIMIT_S)
    acc.log.wait_for(1)
    assert acc.ids() == Counter([call])
    assert a.execute.on("b", timeout=LIMIT_S).accounts.balance(3) == 3


def test_a_peer_that_says_it_is_another_cage_is_refused(
    make_cage: MakeCage, caplog: pytest.LogCaptureFixture,
) -> None:
    """Cage c answering where a expects b: a drops the connection naming both; c stores nothing."""
    caplog.set_level(logging.INFO, logger="pmq.transport")
    c = make_cage("c", listen="127.0.0.1:0", expose={"accounts": Accounts()})
    before = next_seq(c)
    a = make_cage("a", peers={"b": at(c)})
    call = a.execute.on("b_queue").accounts.credit(1, amount=1)
    wait_until(lambda: bool(records(caplog, "link a -> b", "expected cage 'b'",
                                    "peer says it is 'c'")),
               "the link logs the name mismatch")
    nothing_accepted(c, before)
    assert a.call_status(call).state == "stored"


# ---- what a cage exposes ----------------------------------------------------------------------


def test_a_call_the_peer_does_not_expose_is_refused_then_replayed_once_it_is(
    make_cage: MakeCage, tmp_path: Path,
) -> None:
    """A call b does not expose is a 'refused' dead letter; replayed once it is exposed, it runs."""
    b = make_cage("b", listen="127.0.0.1:0")
    port = b.address[1] if b.address else 0
    a = make_cage("a", peers={"b": local(port)})
    call = a.execute.on("b_queue").accounts.credit(1, amount=5)
    a.drain(timeout=LIMIT_S)

    assert a.call_status(call)[:2] == ("dead", "refused")
    [letter] = a.dead_letters()
    assert (letter.call_id, letter.queue, letter.module, letter.method, letter.reason,
            letter.source) == (call, "b_queue", "accounts", "credit", "refused", "a")
    assert "accounts.credit is not exposed by cage b" in letter.detail
    assert b.store is not None
    assert b.store.pending("a_queue") == 0
    assert b.stats()["counters"]["accepted"] == 0

    b.stop()
    acc = Accounts()
    b = make_cage("b", data_dir=tmp_path / "b", listen=local(port), expose={"accounts": acc})
    a.replay(call)
    a.drain(timeout=LIMIT_S)
    acc.log.wait_for(1)
    b.drain(timeout=LIMIT_S)
    assert a.dead_letters() == []
    assert a.call_status(call).state == "transmitted"
    assert [item[1:] for item in acc.log.items] == [("a", "a_queue", 1, 5)]


def test_a_replayed_call_keeps_its_call_id_on_the_receiving_cage(
    make_cage: MakeCage, tmp_path: Path,
) -> None:
    """The handler of a call that was refused and then replayed sees the id execute returned."""
    b = make_cage("b", listen="127.0.0.1:0")
    port = b.address[1] if b.address else 0
    a = make_cage("a", peers={"b": local(port)})
    call = a.execute.on("b_queue").accounts.credit(1, amount=5)
    a.drain(timeout=LIMIT_S)
    b.stop()
    acc = Accounts()
    make_cage("b", data_dir=tmp_path / "b", listen=local(port), expose={"accounts": acc})
    a.replay(call)
    a.drain(timeout=LIMIT_S)
    acc.log.wait_for(1)
    assert acc.log.items[0][0] == call


def test_a_module_exposed_to_named_cages_refuses_the_others(make_cage: MakeCage) -> None:
    """expose(..., to=['a']): a's calls run; c's queued call is refused and its RPC raises."""
    acc = Accounts()
    b = make_cage("b", listen="127.0.0.1:0", start=False)
    b.expose("accounts", acc, to=["a"])
    b.start()
    a = make_cage("a", peers={"b": at(b)})
    c = make_cage("c", peers={"b": at(b)})
    allowed = a.execute.on("b_queue").accounts.credit(1, amount=1)
    refused = c.execute.on("b_queue").accounts.credit(1, amount=100)
    a.drain(timeout=LIMIT_S)
    c.drain(timeout=LIMIT_S)
    acc.log.wait_for(1)
    b.drain(timeout=LIMIT_S)

    assert acc.ids() == Counter([allowed])
    assert c.call_status(refused)[:2] == ("dead", "refused")
    [letter] = c.dead_letters()
    assert "does not expose accounts to cage c" in letter.detail
    assert a.execute.on("b", timeout=LIMIT_S).accounts.balance(1) == 1
    with pytest.raises(pmq.RemoteError) as caught:
        c.execute.on("b", timeout=LIMIT_S).accounts.balance(1)
    assert caught.value.remote_type == "pmq.NotExposed"
    assert "to cage c" in caught.value.message


def test_a_call_from_a_peer_that_its_handler_rejects_is_replayed_on_the_receiver_by_its_id(
    make_cage: MakeCage,
) -> None:
    """A call b's handler rejects is a dead letter on b under a's call id; b replays it by id."""
    ran = Log()
    ready = threading.Event()

    class Picky:
        def take(self, item: int) -> None:
            if not ready.is_set():
                raise pmq.Reject("not ready for it")
            info = pmq.current_call()
            assert info is not None
            ran.add((info.call_id, item))

    b = make_cage("b", listen="127.0.0.1:0", expose={"picky": Picky()})
    a = make_cage("a", peers={"b": at(b)})
    call = a.execute.on("b_queue").picky.take(7)
    a.drain(timeout=LIMIT_S)
    wait_until(lambda: len(b.dead_letters()) == 1, "b buries the rejected call")
    [letter] = b.dead_letters()
    assert (letter.call_id, letter.source, letter.queue, letter.reason) == (
        call, "a", "a_queue", "rejected")
    assert "not ready for it" in letter.detail
    ready.set()
    b.replay(call)
    assert ran.wait_for(1) == [(call, 7)]
    b.drain(timeout=LIMIT_S)
    assert b.dead_letters() == []


def test_the_receiving_cage_reports_a_call_from_a_peer_as_accepted_then_executed(
    make_cage: MakeCage,
) -> None:
    """b.call_status(id a got) is "accepted" while the call waits on b, then "executed"."""
    service = Service()
    b = make_cage("b", listen="127.0.0.1:0", expose={"svc": service})
    a = make_cage("a", peers={"b": at(b)})
    blocker = a.execute.on("b_queue").svc.wait()
    a.drain(timeout=LIMIT_S)
    try:
        assert service.waiting.wait(LIMIT_S)
        assert b.call_status(blocker).state == "accepted"
    finally:
        service.gate.set()
    b.drain(timeout=LIMIT_S)
    assert b.call_status(blocker).state == "executed"


# ---- synchronous calls ------------------------------------------------------------------------


def test_rpc_results_round_trip_nested_values(make_cage: MakeCage) -> None:
    """RPC results (nested lists, dicts, bytes) come back equal from plain and async handlers."""
    b, _ = serving(make_cage)
    a = make_cage("a", peers={"b": at(b)})
    value = {"list": [1, -2, 2**63, 1.5, None, True, "ünï", b"\x00\xff"],
             "nested": {"deeper": [[], {}, [b"", [{"k": (1, 2)}]]]}, b"raw": b"bytes" * 100}
    expected = {"list": [1, -2, 2**63, 1.5, None, True, "ünï", b"\x00\xff"],
                "nested": {"deeper": [[], {}, [b"", [{"k": [1, 2]}]]]}, b"raw": b"bytes" * 100}
    rpc = a.execute.on("b", timeout=LIMIT_S).svc
    assert rpc.echo(value) == expected
    assert rpc.aecho(value) == expected
    assert rpc.echo(None) is None
    assert rpc.echo(b"") == b""
    assert rpc.caller() == ["a", 1]


def test_rpc_handler_exception_becomes_remote_error_with_type_message_and_traceback(
    make_cage: MakeCage,
) -> None:
    """A handler's exception is a RemoteError with its type, message and traceback text."""
    b, _ = serving(make_cage)
    a = make_cage("a", peers={"b": at(b)})
    with pytest.raises(pmq.RemoteError) as caught:
        a.execute.on("b", timeout=LIMIT_S).svc.lookup("missing")
    error = caught.value
    assert str(error) == "KeyError: 'missing'"
    assert (error.remote_type, error.message) == ("KeyError", "'missing'")
    assert "Traceback" in error.traceback_text and "in lookup" in error.traceback_text
    assert "KeyError: 'missing'" in error.traceback_text

    with pytest.raises(pmq.RemoteError) as caught:
        a.execute.on("b", timeout=LIMIT_S).svc.overdraw(7)
    assert caught.value.remote_type.endswith(".Overdrawn")
    assert caught.value.message == "account 7 is short by 5"


def test_rpc_to_a_method_the_peer_does_not_expose_raises_remote_error(
    make_cage: MakeCage,
) -> None:
    """Unknown module or method on b: RemoteError of type pmq.NotExposed naming it."""
    b, _ = serving(make_cage)
    a = make_cage("a", peers={"b": at(b)})
    with pytest.raises(pmq.RemoteError) as caught:
        a.execute.on("b", timeout=LIMIT_S).ledger.total()
    assert caught.value.remote_type == "pmq.NotExposed"
    assert "ledger.total is not exposed by cage b" in caught.value.message
    with pytest.raises(pmq.RemoteError, match=r"svc\.nothing is not exposed"):
        a.execute.on("b", timeout=LIMIT_S).svc.nothing()


def test_rpc_slower_than_its_timeout_raises_timeout_and_the_link_stays_usable(
    make_cage: MakeCage,
) -> None:
    """An RPC not answered within its timeout raises pmq.Timeout; the link stays usable."""
    b, service = serving(make_cage)
    a = make_cage("a", peers={"b": at(b)})
    rpc = a.execute.on("b", timeout=LIMIT_S).svc
    assert rpc.echo(1) == 1  # the link is up: the short call below can only time out
    try:
        with pytest.raises(pmq.Timeout, match="did not answer within") as caught:
            a.execute.on("b", timeout=SHORT_S).svc.wait()
        assert isinstance(caught.value, TimeoutError)
    finally:
        service.gate.set()
    assert rpc.echo(2) == 2


def test_rpc_after_many_timed_out_ones_fails_cleanly_or_succeeds(
    make_cage: MakeCage, caplog: pytest.LogCaptureFixture,
) -> None:
    """After 1024 RPCs timed out on a stuck handler, another RPC times out or works, no more."""
    caplog.set_level(logging.WARNING)
    b, service = serving(make_cage)
    a = make_cage("a", peers={"b": at(b)})
    assert a.execute.on("b", timeout=LIMIT_S).svc.echo(1) == 1

    async def flood() -> list[Any]:
        calls = [a.aexecute.on("b", timeout=SHORT_S).svc.wait()
                 for _ in range(protocol.MAX_CONCURRENT_REQUESTS)]
        return await asyncio.gather(*calls, return_exceptions=True)

    outcome: Any = None
    try:
        assert {type(o) for o in asyncio.run(flood())} == {pmq.Timeout}
        try:
            outcome = a.execute.on("b", timeout=SHORT_S).svc.echo(2)
        except (pmq.Timeout, pmq.TransportError) as exc:
            outcome = exc
    finally:
        service.gate.set()
    assert outcome == 2 or isinstance(outcome, pmq.Timeout | pmq.TransportError), outcome
    a.stop()
    gc.collect()
    unretrieved = [r.getMessage() for r in list(caplog.records)
                   if "exception was never retrieved" in r.getMessage()]
    assert unretrieved == []


def test_stop_closes_connections_that_arrive_as_the_cage_stops(make_cage: MakeCage) -> None:
    """A connection accepted in the moment the cage stops, before its handler has run, is
    closed by stop(): its peer sees the end, and no socket is left for the garbage collector."""
    for round_ in range(5):
        b, _ = serving(make_cage, f"b{round_}")
        assert b.address is not None
        with contextlib.ExitStack() as open_:
            clients = [open_.enter_context(socket.create_connection(b.address, timeout=LIMIT_S))
                       for _ in range(20)]
            b.stop()
            for number, client in enumerate(clients):
                try:
                    while client.recv(65536):  # the HELLO, when its handler ran
                        pass
                except ConnectionResetError:
                    pass  # still in the listener's backlog when it closed
                except TimeoutError:
                    pytest.fail(f"round {round_}: connection {number} is still open after stop()")
        gc.collect()


def test_rpc_to_a_peer_nobody_listens_for_raises_transport_error(make_cage: MakeCage) -> None:
    """An RPC to an address that refuses connections raises pmq.TransportError after its timeout."""
    a = make_cage("a", peers={"b": local(free_port())})
    with pytest.raises(pmq.TransportError, match="cannot be reached") as caught:
        a.execute.on("b", timeout=SHORT_S).svc.echo(1)
    assert isinstance(caught.value, ConnectionError)


def test_rpc_to_an_unknown_peer_or_to_itself_raises_value_error(make_cage: MakeCage) -> None:
    """A synchronous call to a cage not in peers, or to this cage, is a ValueError."""
    b, _ = serving(make_cage)
    a = make_cage("a", peers={"b": at(b)})
    with pytest.raises(ValueError, match="unknown peer 'x'"):
        a.execute.on("x", timeout=LIMIT_S).svc.echo(1)
    with pytest.raises(ValueError, match="loopback_queue"):
        a.execute.on("a", timeout=LIMIT_S).svc.echo(1)


def test_rpc_on_a_stopped_cage_raises_runtime_error(make_cage: MakeCage) -> None:
    """A synchronous call on a cage that is not running says so, as a queued call does."""
    b, _ = serving(make_cage)
    a = make_cage("a", peers={"b": at(b)}, start=False)
    with pytest.raises(RuntimeError, match="not started"):
        a.execute.on("b_queue").svc.echo(1)
    outcome: tuple[type[BaseException], str] | None = None
    # The failure leaves a coroutine that was never awaited: let its warning go here, inside
    # this test, rather than at the end of the session.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            a.execute.on("b", timeout=LIMIT_S).svc.echo(1)
        except Exception as exc:  # judged below, once the coroutine is gone
            outcome = (type(exc), str(exc))
        gc.collect()
    assert outcome is not None and issubclass(outcome[0], RuntimeError), outcome
    assert "not started" in outcome[1]


def test_aexecute_rpc_from_a_coroutine(make_cage: MakeCage, tmp_path: Path) -> None:
    """await aexecute RPC works on a cage on the caller's loop and on one on its own thread."""
    b, _ = serving(make_cage)
    threaded = make_cage("t", peers={"b": at(b)})
    unreachable = make_cage("u", peers={"b": local(free_port())})

    async def main() -> list[Any]:
        async with pmq.Cage("a", data_dir=tmp_path / "a", peers={"b": at(b)}) as a:
            got = [await a.aexecute.on("b", timeout=LIMIT_S).svc.echo([1, b"x", {"y": 2}]),
                   await a.aexecute.on("b", timeout=LIMIT_S).svc.aecho("async")]
            with pytest.raises(pmq.RemoteError, match="KeyError"):
                await a.aexecute.on("b", timeout=LIMIT_S).svc.lookup("k")
            with pytest.raises(RuntimeError, match="aexecute"):
                a.execute.on("b", timeout=LIMIT_S).svc.echo(1)
        got.append(await threaded.aexecute.on("b", timeout=LIMIT_S).svc.echo("threaded"))
        with pytest.raises(pmq.TransportError, match="cannot be reached"):
            await unreachable.aexecute.on("b", timeout=SHORT_S).svc.echo(1)
        return got

    assert asyncio.run(main()) == [[1, b"x", {"y": 2}], "async", "threaded"]


# ---- deadlines --------------------------------------------------------------------------------


def test_a_call_whose_deadline_passes_while_the_peer_is_down_is_dead_as_expired(
    make_cage: MakeCage,
) -> None:
    """A call whose deadline passes while b is down becomes an 'expired' dead letter on a."""
    port = free_port()
    a = make_cage("a", peers={"b": local(port)})
    late = a.execute.on("b_queue", expires_in=SHORT_S).accounts.credit(1, amount=1)
    deadline = time.time() + SHORT_S  # no earlier than the call's own deadline
    kept = a.execute.on("b_queue").accounts.credit(2, amount=1)
    wait_until(lambda: time.time() > deadline, "the deadline passed")

    acc = Accounts()
    make_cage("b", listen=local(port), expose={"accounts": acc})
    a.drain(timeout=LIMIT_S)
    assert a.call_status(late)[:2] == ("dead", "expired")
    [letter] = a.dead_letters()
    assert (letter.call_id, letter.reason, letter.module, letter.method) == (
        late, "expired", "accounts", "credit")
    assert "deadline" in letter.detail
    assert a.call_status(kept).state == "transmitted"
    acc.log.wait_for(1)
    assert acc.ids() == Counter([kept])


# ---- listening beyond loopback ----------------------------------------------------------------


def test_listening_on_all_interfaces_without_secret_or_tls_raises_value_error(
    tmp_path: Path,
) -> None:
    """listen='0.0.0.0:0' without secret or TLS raises ValueError naming allow_insecure."""
    with pytest.raises(ValueError, match="allow_insecure"):
        pmq.Cage("a", data_dir=tmp_path / "a", listen="0.0.0.0:0")
    assert not (tmp_path / "a").exists()


def test_listening_on_all_interfaces_starts_with_allow_insecure_or_a_secret(
    make_cage: MakeCage,
) -> None:
    """allow_insecure=True or a secret lets a cage listen on 0.0.0.0; localhost needs neither."""
    acc = Accounts()
    b = make_cage("b", listen="0.0.0.0:0", allow_insecure=True, expose={"accounts": acc})
    assert b.address is not None and b.address[0] == "0.0.0.0" and b.address[1] > 0
    a = make_cage("a", peers={"b": local(b.address[1])})
    call = a.execute.on("b_queue").accounts.credit(1, amount=1)
    a.drain(timeout=LIMIT_S)
    assert acc.log.wait_for(1)[0][0] == call

    guarded = make_cage("g", listen="0.0.0.0:0", secret=b"s")
    assert guarded.address is not None and guarded.address[0] == "0.0.0.0"
    named = make_cage("n", listen="localhost:0")
    assert named.address is not None


# ---- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and certificates naming cages a, b and c (CN and DNS SAN), made with openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command line tool is not installed: TLS tests need it to make "
                    "their certificates")
    directory = tmp_path_factory.mktemp("certs")

    def run(*args: str) -> None:
        done = subprocess.run([openssl, *args], cwd=directory, capture_output=True, text=True,
                              timeout=LIMIT_S, check=False)
        assert done.returncode == 0, f"openssl {' '.join(args)} failed:\n{done.stderr}"

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=pmq test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for serial, name in enumerate(("a", "b", "c"), start=1):
        (directory / f"{name}.ext").write_text(
            f"subjectAltName=DNS:{name}\nbasicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-set_serial", str(serial), "-days", "2", "-out", f"{name}.pem",
            "-extfile", f"{name}.ext")
    return directory


@pytest.fixture
def make_tls_cage(make_cage: MakeCage) -> Iterator[MakeCage]:
    """make_cage for the TLS tests, whose cages are stopped here with ResourceWarning muted.

    Stopping a cage leaves its TLS sockets unclosed (see
    test_stopping_a_cage_closes_its_tls_connections_while_the_peer_is_busy); muted here, the
    warnings cannot fail whichever later test the garbage collector happens to run in.
    """
    made: list[pmq.Cage] = []

    def make(*args: Any, **kwargs: Any) -> pmq.Cage:
        cage = make_cage(*args, **kwargs)
        made.append(cage)
        return cage

    yield make
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        for cage in reversed(made):
            cage.stop()
        gc.collect()


def tls_server(certs: Path, name: str, *, require: bool = True) -> ssl.SSLContext:
    """A listener's context with `name`'s certificate; it requires and verifies the peer's."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / f"{name}.pem", certs / f"{name}.key")
    context.load_verify_locations(certs / "ca.pem")
    context.verify_mode = ssl.CERT_REQUIRED if require else ssl.CERT_NONE
    return context


def tls_client(certs: Path, name: str, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A connecting context with `name`'s certificate; it verifies the listener's."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_cert_chain(certs / f"{name}.pem", certs / f"{name}.key")
    context.load_verify_locations(certs / "ca.pem")
    context.check_hostname = check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    return context


def test_tls_with_certificates_required_both_ways_carries_calls_and_rpc(
    make_tls_cage: MakeCage, certs: Path,
) -> None:
    """TLS with certificates required both ways carries queued calls both ways and RPC."""
    port_a, port_b = free_port(), free_port()
    acc_a, acc_b = Accounts(), Accounts()
    a = make_tls_cage("a", listen=local(port_a), peers={"b": local(port_b)},
                  tls_server=tls_server(certs, "a"), tls_client=tls_client(certs, "a"),
                  expose={"accounts": acc_a})
    b = make_tls_cage("b", listen=local(port_b), peers={"a": local(port_a)},
                  tls_server=tls_server(certs, "b"), tls_client=tls_client(certs, "b"),
                  expose={"accounts": acc_b})
    to_b = [a.execute.on("b_queue").accounts.credit(1, amount=1) for _ in range(10)]
    to_a = [b.execute.on("a_queue").accounts.credit(2, amount=1) for _ in range(10)]
    a.drain(timeout=LIMIT_S)
    b.drain(timeout=LIMIT_S)
    acc_b.log.wait_for(10)
    acc_a.log.wait_for(10)
    assert acc_b.ids() == Counter(to_b)
    assert acc_a.ids() == Counter(to_a)
    assert a.execute.on("b", timeout=LIMIT_S).accounts.balance(1) == 10
    assert b.execute.on("a", timeout=LIMIT_S).accounts.balance(2) == 10


def test_tls_on_all_interfaces_needs_no_allow_insecure(
    make_tls_cage: MakeCage, certs: Path,
) -> None:
    """A TLS listener on 0.0.0.0 starts without allow_insecure and serves 127.0.0.1 peers."""
    acc = Accounts()
    b = make_tls_cage("b", listen="0.0.0.0:0", tls_server=tls_server(certs, "b"),
                  expose={"accounts": acc})
    assert b.address is not None
    a = make_tls_cage("a", peers={"b": local(b.address[1])}, tls_client=tls_client(certs, "a"))
    call = a.execute.on("b_queue").accounts.credit(1, amount=1)
    a.drain(timeout=LIMIT_S)
    assert acc.log.wait_for(1)[0][0] == call


@pytest.mark.parametrize("check_hostname", [False, True],
                         ids=["pmq-checks-the-name", "ssl-checks-the-name"])
def test_tls_listener_whose_certificate_names_another_cage_is_refused(
    make_tls_cage: MakeCage, certs: Path, caplog: pytest.LogCaptureFixture, check_hostname: bool,
) -> None:
    """A listener whose certificate names cage c is refused by a, which logs why."""
    caplog.set_level(logging.DEBUG, logger="pmq.transport")
    acc = Accounts()
    b = make_tls_cage("b", listen="127.0.0.1:0", tls_server=tls_server(certs, "c"),
                  expose={"accounts": acc})
    before = next_seq(b)
    a = make_tls_cage("a", peers={"b": at(b)},
                  tls_client=tls_client(certs, "a", check_hostname=check_hostname))
    call = a.execute.on("b_queue").accounts.credit(1, amount=1)
    if check_hostname:
        wait_until(lambda: bool(records(caplog, "link a -> b", "certificate verify failed")),
                   "the link logs the failed verification")
    else:
        wait_until(lambda: bool(records(caplog, "link a -> b", "says it is cage 'b'",
                                        "names ['c']")),
                   "the link logs the certificate's name")
    with pytest.raises(pmq.TransportError):
        a.execute.on("b", timeout=SHORT_S).accounts.balance(1)
    nothing_accepted(b, before)
    assert a.call_status(call).state == "stored"
    assert acc.log.items == []


def test_tls_client_whose_certificate_names_another_cage_is_refused_by_the_listener(
    make_tls_cage: MakeCage, certs: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A client certificate naming cage c is refused by b, which logs it and stores nothing."""
    caplog.set_level(logging.INFO, logger="pmq.transport")
    b = make_tls_cage("b", listen="127.0.0.1:0", tls_server=tls_server(certs, "b"),
                  expose={"accounts": Accounts()})
    before = next_seq(b)
    a = make_tls_cage("a", peers={"b": at(b)}, tls_client=tls_client(certs, "c"))
    call = a.execute.on("b_queue").accounts.credit(1, amount=1)
    wait_until(lambda: bool(records(caplog, "cage b dropped the connection",
                                    "says it is cage 'a'", "names ['c']")),
               "the listener logs the certificate's name")
    nothing_accepted(b, before)
    assert a.call_status(call).state == "stored"


def test_tls_listener_that_does_not_ask_for_client_certificates_refuses_every_peer(
    make_tls_cage: MakeCage, certs: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A TLS listener with CERT_NONE refuses each peer as presenting no certificate."""
    caplog.set_level(logging.INFO, logger="pmq.transport")
    b = make_tls_cage("b", listen="127.0.0.1:0", tls_server=tls_server(certs, "b", require=False),
                  expose={"accounts": Accounts()})
    before = next_seq(b)
    a = make_tls_cage("a", peers={"b": at(b)}, tls_client=tls_client(certs, "a"))
    call = a.execute.on("b_queue").accounts.credit(1, amount=1)
    wait_until(lambda: bool(records(caplog, "cage b dropped the connection",
                                    "presented no certificate")),
               "the listener logs the missing certificate")
    nothing_accepted(b, before)
    assert a.call_status(call).state == "stored"


class Hog:
    """An async handler that blocks its cage's event loop until the test opens the gate."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.gate = threading.Event()

    async def block(self) -> None:
        """Hold the loop (on purpose: the cage answers nothing meanwhile)."""
        self.started.set()
        self.gate.wait(LIMIT_S)


def test_stopping_a_cage_closes_its_tls_connections_while_the_peer_is_busy(
    make_tls_cage: MakeCage, certs: Path,
) -> None:
    """A cage stopping while its TLS peer is busy still closes its socket (no ResourceWarning)."""
    hog = Hog()
    b = make_tls_cage("b", listen="127.0.0.1:0", tls_server=tls_server(certs, "b"),
                      expose={"hog": hog})
    a = make_tls_cage("a", peers={"b": at(b)}, tls_client=tls_client(certs, "a"))
    a.execute.on("b_queue").hog.block()
    try:
        assert hog.started.wait(LIMIT_S)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a.stop()
            gc.collect()
    finally:
        hog.gate.set()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []


# ---- stopping ---------------------------------------------------------------------------------


def test_stopping_a_cage_with_a_connected_peer_logs_no_error(
    make_cage: MakeCage, caplog: pytest.LogCaptureFixture,
) -> None:
    """b stops while a is connected to it: nothing is logged at ERROR."""
    caplog.set_level(logging.WARNING)
    acc = Accounts()
    b = make_cage("b", listen="127.0.0.1:0", expose={"accounts": acc})
    a = make_cage("a", peers={"b": at(b)})
    a.execute.on("b_queue").accounts.credit(1, amount=1)
    a.drain(timeout=LIMIT_S)
    acc.log.wait_for(1)
    b.stop()
    errors = [f"{r.name}: {r.getMessage()}" for r in list(caplog.records)
              if r.levelno >= logging.ERROR]
    assert errors == []


# ---- acknowledgements and durability ----------------------------------------------------------


class RawPeer:
    """One connection to a cage driven by hand with pmq.protocol: a sender that is no cage."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 conn: protocol.Connection) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = conn

    @classmethod
    async def connect(cls, address: tuple[str, int], name: str, journal_id: bytes) -> RawPeer:
        """Connect as cage `name` with journal `journal_id` and complete the handshake."""
        reader, writer = await asyncio.open_connection(*address)
        peer = cls(reader, writer, protocol.Connection("client", name, journal_id))
        writer.write(peer.conn.initiate())
        event = await peer.next_event()
        assert isinstance(event, protocol.Established), event
        return peer

    async def next_event(self) -> Any:
        """The next event from the cage (safe to cancel: no byte read is lost)."""
        while True:
            event = self.conn.next_event()
            reply = self.conn.data_to_send()
            if reply:
                self.writer.write(reply)
            if event is not protocol.NEED_DATA:
                return event
            self.conn.receive_data(await self.reader.read(65536))

    async def next_ack(self) -> protocol.Ack:
        """The next ACK (PINGs and PONGs are skipped)."""
        while True:
            event = await self.next_event()
            if isinstance(event, protocol.Ack):
                return event
            assert isinstance(event, protocol.Ping | protocol.Pong), event

    def send(self, event: protocol.SendEvent) -> None:
        """Write one message."""
        self.writer.write(self.conn.send(event))

    def close(self) -> None:
        """Drop the connection."""
        self.writer.close()


class _GatedJournal:
    """A journal whose ``sync_async`` waits for a gate first: an fsync that takes its time."""

    def __init__(self, journal: Any, gate: threading.Event) -> None:
        self._journal = journal
        self._gate = gate

    def sync_async(self, seq: int | None = None) -> asyncio.Future[None]:
        """Wait for the gate (off the loop), then sync as the real journal does."""
        return asyncio.ensure_future(self._sync_after_gate(seq))

    async def _sync_after_gate(self, seq: int | None) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._gate.wait, LIMIT_S)
        await self._journal.sync_async(seq)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._journal, name)


class _GatedStore:
    """The cage's store, seen through a _GatedJournal."""

    def __init__(self, store: Any, gate: threading.Event) -> None:
        self._store = store
        self.journal = _GatedJournal(store.journal, gate)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_reconnecting_sender_is_acknowledged_only_calls_that_are_durable(
    make_cage: MakeCage,
) -> None:
    """A sender's second connection is acknowledged only calls durable on the receiver."""
    # Reaches inside: b's transport sees its store through a journal whose fsyncs wait for a
    # gate, so the moment between "appended" and "durable" lasts as long as the test needs.
    acc = Accounts()
    b = make_cage("b", listen="127.0.0.1:0", expose={"accounts": acc})
    assert b.store is not None and b.transport is not None and b.address is not None
    store, address = b.store, b.address
    gate = threading.Event()
    b.transport.store = _GatedStore(store, gate)  # type: ignore[assignment]
    journal_id = os.urandom(16)

    async def scenario() -> tuple[int, int, int]:
        first = await RawPeer.connect(address, "a", journal_id)
        second: RawPeer | None = None
        try:
            assert (await first.next_ack()).high == 0
            first.send(protocol.Batch(0, [protocol.WireCall(
                1, "accounts", "credit", pack_arguments([1], {"amount": 5}), None, None,
                time.time())]))
            async with asyncio.timeout(LIMIT_S):
                while store.link_state("a", journal_id)[0] < 1:
                    await asyncio.sleep(0.01)
            accepted_at = store.journal.next_seq - 1  # the frame that holds the call
            second = await RawPeer.connect(address, "a", journal_id)
            try:
                async with asyncio.timeout(2.0):
                    ack = await second.next_ack()
            except TimeoutError:
                gate.set()  # a cage that waits for the fsync answers once it is done
                async with asyncio.timeout(LIMIT_S):
                    ack = await second.next_ack()
            return ack.high, store.journal.durable_seq, accepted_at
        finally:
            gate.set()
            first.close()
            if second is not None:
                second.close()

    high, durable, accepted_at = asyncio.run(scenario())
    assert high == 0 or durable >= accepted_at, (
        f"ACK.high={high} sent while the journal was durable up to seq {durable} only; the "
        f"call was accepted in seq {accepted_at}")
    acc.log.wait_for(1)


# ---- cages in their own processes -------------------------------------------------------------


class Child:
    """A cage_peer.py process: what it reported, and the commands it is given."""

    def __init__(self, name: str, directory: Path, port: int, runs: Path,
                 peers: dict[str, int], stderr: Path) -> None:
        self.name = name
        self.runs = runs
        self.stderr = stderr
        args = [sys.executable, str(PEER_SCRIPT), name, str(directory), str(port), str(runs),
                *(f"{peer}={peer_port}" for peer, peer_port in peers.items())]
        with open(stderr, "wb") as err:  # a file: a chatty child never blocks on a full pipe
            self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err)
        self.lines: list[str] = []
        self.eof = False
        self._used: set[int] = set()
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._changed:
                self.lines.append(raw.decode().rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.eof = True
            self._changed.notify_all()

    def tell(self, command: str) -> None:
        """Send one command line."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, prefix: str) -> str:
        """The next line, not returned before, that starts with `prefix` (waits for it)."""

        def find() -> int | None:
            for index, line in enumerate(self.lines):
                if index not in self._used and line.startswith(prefix):
                    return index
            return None

        with self._changed:
            self._changed.wait_for(lambda: find() is not None or self.eof, LIMIT_S)
            index = find()
            assert index is not None, (
                f"cage process {self.name} never said {prefix!r}; it said {self.lines[-5:]}, "
                f"stderr: {self.stderr.read_text(errors='replace')[-3000:]}")
            self._used.add(index)
            return self.lines[index]

    def made(self) -> dict[str, str]:
        """Tag -> call id of every call whose execute returned in this process."""
        with self._changed:
            lines = list(self.lines)
        made = {}
        for line in lines:
            if line.startswith("made "):
                _, tag, call_id = line.split(" ")
                made[tag] = call_id
        return made

    def finish(self) -> None:
        """Drain, stop and exit with status 0."""
        self.tell("drain")
        self.expect("drained")
        self.tell("stop")
        self.expect("stopped")
        assert self.proc.wait(LIMIT_S) == 0, self.stderr.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the process (if it still runs) and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(LIMIT_S)
        self._reader.join(LIMIT_S)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    """Start cage processes (``spawn(name, port, {peer: port})``); kill leftovers at the end.

    A cage started again under the same name reuses its directory; each life has its own runs
    file (a line a SIGKILL tore stays at the end of its own file).
    """
    children: list[Child] = []

    def start(name: str, port: int, peers: dict[str, int]) -> Child:
        life = f"{name}-{len(children)}"
        child = Child(name, tmp_path / name, port, tmp_path / f"{life}.runs", peers,
                      tmp_path / f"{life}.stderr")
        children.append(child)
        child.expect("ready")
        return child

    yield start
    for child in children:
        child.kill()


Run = tuple[str, str, int, str]  # call id, source, attempt, tag


def read_runs(path: Path) -> list[Run]:
    """The executions a cage process recorded, in order; a torn last line (the process was
    SIGKILLed in the middle of writing it) is left out."""
    text = path.read_text() if path.exists() else ""
    runs = []
    for line in text.split("\n")[:-1]:
        call_id, source, attempt, tag = line.split(" ")
        runs.append((call_id, source, int(attempt), tag))
    return runs


def ran_tags(path: Path) -> set[str]:
    """The tags a cage process ran so far."""
    return {run[3] for run in read_runs(path)}


def ran_all(path: Path, tags: set[str]) -> bool:
    """Whether the cage process whose runs file is `path` ran every one of `tags`."""
    return ran_tags(path) >= tags


def assert_ran_once_each(runs: list[Run], made: dict[str, tuple[str, str]]) -> None:
    """Every call in `made` (tag -> (call id, source)) ran exactly once, on its first attempt,
    under the id execute returned; nothing else ran."""
    counts = Counter(run[3] for run in runs)
    assert {tag: n for tag, n in counts.items() if n > 1} == {}, "calls ran twice"
    assert set(counts) == set(made)
    for call_id, source, attempt, tag in runs:
        assert (call_id, source, attempt) == (*made[tag], 1), tag


def test_two_cage_processes_call_each_other_and_every_call_runs_once(
    spawn: Callable[..., Child],
) -> None:
    """Two cage processes calling each other at once: every call runs once, under its id."""
    port_a, port_b = free_port(), free_port()
    a = spawn("a", port_a, {"b": port_b})
    b = spawn("b", port_b, {"a": port_a})
    a.tell("send b 60")
    b.tell("send a 45")
    a.expect("sent b")
    b.expect("sent a")
    from_a = {tag: (call_id, "a") for tag, call_id in a.made().items()}
    from_b = {tag: (call_id, "b") for tag, call_id in b.made().items()}
    assert (len(from_a), len(from_b)) == (60, 45)
    wait_until(lambda: ran_tags(b.runs) >= set(from_a), "b ran a's calls")
    wait_until(lambda: ran_tags(a.runs) >= set(from_b), "a ran b's calls")
    a.tell("rpc b")
    assert a.expect("rpc b ") == "rpc b 60"
    b.tell("rpc a")
    assert b.expect("rpc a ") == "rpc a 45"
    a.finish()
    b.finish()
    assert_ran_once_each(read_runs(b.runs), from_a)
    assert_ran_once_each(read_runs(a.runs), from_b)


def test_three_cage_processes_deliver_every_call_once(spawn: Callable[..., Child]) -> None:
    """Three cage processes (a<->b, a->c, b->c) at once: every call runs once where it was sent."""
    port_a, port_b, port_c = free_port(), free_port(), free_port()
    a = spawn("a", port_a, {"b": port_b, "c": port_c})
    b = spawn("b", port_b, {"a": port_a, "c": port_c})
    c = spawn("c", port_c, {})
    a.tell("send b 30")
    a.tell("send c 30")
    b.tell("send a 30")
    b.tell("send c 30")
    for sender, peers in ((a, "bc"), (b, "ac")):
        for peer in peers:
            sender.expect(f"sent {peer}")

    def sent(sender: Child, name: str, peer: str) -> dict[str, tuple[str, str]]:
        return {tag: (call_id, name) for tag, call_id in sender.made().items()
                if tag.split(">")[1].startswith(f"{peer}/")}

    to_a, to_b = sent(b, "b", "a"), sent(a, "a", "b")
    to_c = {**sent(a, "a", "c"), **sent(b, "b", "c")}
    assert (len(to_a), len(to_b), len(to_c)) == (30, 30, 60)
    for child, expected in ((a, to_a), (b, to_b), (c, to_c)):
        wait_until(functools.partial(ran_all, child.runs, set(expected)),
                   f"{child.name} ran its calls")
    for child in (a, b, c):
        child.finish()
    for child, expected in ((a, to_a), (b, to_b), (c, to_c)):
        assert_ran_once_each(read_runs(child.runs), expected)


def streaming(spawn: Callable[..., Child], calls: int) -> tuple[Child, Child, int, int]:
    """Cages a and b in processes of their own, a sending `calls` calls to b, and b running
    them (100 have run): (a, b, a's port, b's port)."""
    port_a, port_b = free_port(), free_port()
    b = spawn("b", port_b, {})
    a = spawn("a", port_a, {"b": port_b})
    a.tell(f"send b {calls}")
    wait_until(lambda: len(read_runs(b.runs)) >= 100, "b runs a's calls")
    return a, b, port_a, port_b


def test_a_sender_process_killed_while_streaming_delivers_each_call_once_after_restart(
    spawn: Callable[..., Child],
) -> None:
    """A sender SIGKILLed mid-stream and restarted: every call it made runs on b, none twice."""
    a, b, port_a, port_b = streaming(spawn, 1500)
    a.kill()
    made = a.made()
    print(f"a was killed after {len(made)} of 1500 calls; b had run {len(read_runs(b.runs))}")
    a = spawn("a", port_a, {"b": port_b})
    a.finish()  # drain: whatever the first life stored is sent (again)
    wait_until(lambda: ran_tags(b.runs) >= set(made), "b ran every call a made")
    b.finish()
    runs = read_runs(b.runs)
    counts = Counter(run[3] for run in runs)
    assert {tag: n for tag, n in counts.items() if n > 1} == {}, "calls ran twice"
    for call_id, source, attempt, tag in runs:
        assert source == "a" and attempt == 1
        assert made.get(tag, call_id) == call_id, tag  # unreported calls may run too, once


def test_a_receiver_process_killed_while_running_calls_gets_every_call_after_restart(
    spawn: Callable[..., Child],
) -> None:
    """A receiver SIGKILLed mid-stream and restarted runs every call; a rerun has a new attempt."""
    a, b, _, port_b = streaming(spawn, 500)
    b.kill()
    first = read_runs(b.runs)
    print(f"b was killed after running {len(first)} calls; a had made {len(a.made())} of 500")
    b = spawn("b", port_b, {})
    a.expect("sent b")
    made = a.made()
    assert len(made) == 500
    a.finish()
    wait_until(lambda: {run[3] for run in first} | ran_tags(b.runs) >= set(made),
               "b ran every call a made")
    b.finish()
    second = read_runs(b.runs)

    for life in (first, second):
        counts = Counter(run[3] for run in life)
        assert {tag: n for tag, n in counts.items() if n > 1} == {}, "ran twice in one life"
    assert {run[3] for run in first + second} == set(made)
    for run in first + second:
        assert run[:2] == (made[run[3]], "a"), run
    attempts = {run[3]: run[2] for run in first}
    again = [run for run in second if run[3] in attempts]
    for call_id, _, attempt, tag in again:
        assert attempt > attempts[tag], f"{tag} ({call_id}) ran again without a new attempt"
    print(f"{len(again)} calls ran again after b's SIGKILL (the documented window)")
