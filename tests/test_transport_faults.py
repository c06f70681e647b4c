"""The transport between two cages under network faults and bad input (DESIGN.md §5, §7).

Cage A calls cage B. Part 1 puts a fault-injecting TCP proxy (tests/tcp_proxy.py) between them
and checks that every queued call still runs on B exactly once (no duplicate at all: nothing
crashes here) and that RPC times out through a stalled link, then works again. Part 2 talks to
B from raw sockets: random bytes, bad frames and bad messages, a wrong secret, messages out of
order; each such connection must be closed by B, and nothing from it stored, while a
well-behaved A keeps sending queued calls and RPCs to B the whole time. Part 3: a cage that B
does not list, with the right secret, may call B.

Conventions as in tests/helpers.py: real disk, no timing assertions, generous waits. Hypothesis
examples each use a fresh socket to the one B the test started (B is started once per test, not
per example); the default run makes 100 examples of each kind, ``make torture`` 100,000 of all
kinds mixed, with a secret and without.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pmq
from conftest import rounds
from helpers import LIMIT_S, MIB, wait_until
from pmq import protocol
from pmq._codec import pack_arguments
from tcp_proxy import Direction, TcpProxy

SECRET = b"transport-fault-secret"
SEED = 20240611
#: Journal segments of this file's cages: it starts dozens, and the default 64 MiB is preallocated.
SEGMENT_BYTES = 4 * MIB


class Sink:
    """B's exposed module: counts each executed call by call id, by value and by queue."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_id: Counter[str] = Counter()
        self.by_value: Counter[int] = Counter()
        self.by_queue: Counter[str] = Counter()
        self.sources: set[str] = set()

    def record(self, value: int) -> None:
        call = pmq.current_call()
        assert call is not None
        with self.lock:
            self.by_id[call.call_id] += 1
            self.by_value[value] += 1
            self.by_queue[call.queue] += 1
            self.sources.add(call.source)

    def echo(self, value: Any) -> Any:
        return value

    def check_exactly_once(self, ids: list[str], values: list[int]) -> None:
        """Every call in ``ids`` (with ``values``) ran once, and nothing else ran."""
        with self.lock:
            repeated = {i: n for i, n in self.by_id.items() if n != 1}
            assert not repeated, f"calls that ran more than once: {list(repeated.items())[:10]}"
            missing = set(ids) - set(self.by_id)
            assert not missing, f"{len(missing)} calls never ran, e.g. {sorted(missing)[:5]}"
            extra = set(self.by_id) - set(ids)
            assert not extra, f"calls that nobody made ran: {sorted(extra)[:5]}"
            assert self.by_value == Counter(values)


def address_of(cage: pmq.Cage) -> tuple[str, int]:
    assert cage.address is not None
    return cage.address


def peer_address(cage: pmq.Cage) -> str:
    """Where ``cage`` listens, as another cage's ``peers`` entry."""
    host, port = address_of(cage)
    return f"{host}:{port}"


@pytest.fixture
def make_cage(make_cage: Callable[..., pmq.Cage]) -> Callable[..., pmq.Cage]:
    """conftest's ``make_cage``, with small journal segments."""
    return partial(make_cage, segment_bytes=SEGMENT_BYTES)


@pytest.fixture
def make_proxy() -> Iterator[Callable[[tuple[str, int]], TcpProxy]]:
    """Start TcpProxy instances in front of an address; close them all at teardown."""
    made: list[TcpProxy] = []

    def make(target: tuple[str, int]) -> TcpProxy:
        proxy = TcpProxy(target).start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


def proxied_pair(make_cage: Callable[..., pmq.Cage],
                 make_proxy: Callable[[tuple[str, int]], TcpProxy],
                 sink: Sink) -> tuple[pmq.Cage, TcpProxy, pmq.Cage]:
    """(A, proxy, B): B listens, A reaches it through the proxy."""
    b = make_cage("b", listen="127.0.0.1:0", expose={"sink": sink})
    proxy = make_proxy(address_of(b))
    a = make_cage("a", peers={"b": proxy.address})
    return a, proxy, b


def count_incoming(cage: pmq.Cage) -> Counter[str]:
    """Count the calls that reach ``cage.store.accept`` (redeliveries included)."""
    store = cage.store
    assert store is not None
    seen: Counter[str] = Counter()
    accept = store.accept

    def counting(source: str, journal_id: bytes, calls: Any, *args: Any) -> Any:
        calls = list(calls)
        seen["calls"] += len(calls)
        return accept(source, journal_id, calls, *args)

    store.accept = counting  # type: ignore[method-assign, assignment]
    return seen


def cut_or_delivered(a: pmq.Cage, fired: threading.Event | None) -> bool:
    """Whether the cut ``fired``, or else A has no call left to deliver."""
    assert a.store is not None
    return (fired is not None and fired.is_set()) or a.store.outstanding() == 0


def settle_both(a: pmq.Cage, b: pmq.Cage) -> None:
    a.drain(timeout=LIMIT_S)
    b.drain(timeout=LIMIT_S)


def reconnected(a: pmq.Cage, proxy: TcpProxy, connections: int) -> Callable[[], bool]:
    """Whether A has a new link to B through ``proxy`` (which had ``connections`` before).

    RPC is not retried over a new connection, so a test that cut the link waits for this.
    """
    def check() -> bool:
        assert a.transport is not None
        return proxy.counters["connections"] > connections and a.transport.links["b"].up.is_set()

    return check


class GatedJournal:
    """A cage's journal whose fsyncs wait while ``open`` is clear; all else passes through."""

    def __init__(self, journal: Any) -> None:
        self.journal = journal
        self.open = threading.Event()
        self.open.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.journal, name)

    def sync(self, seq: int | None = None) -> None:
        assert self.open.wait(LIMIT_S), "the journal gate stayed shut"
        self.journal.sync(seq)

    def sync_async(self, seq: int | None = None) -> asyncio.Future[None]:
        async def gated() -> None:
            while not self.open.is_set():
                await asyncio.sleep(0.005)
            await self.journal.sync_async(seq)

        return asyncio.ensure_future(gated())


# ---- 1. network faults between two cages ------------------------------------------------------


def test_queued_calls_run_exactly_once_across_random_cuts(
    make_cage: Callable[..., pmq.Cage], make_proxy: Callable[[tuple[str, int]], TcpProxy],
) -> None:
    """Thousands of calls a->b while the link is cut mid-frame, both ways: each runs once."""
    sink = Sink()
    a, proxy, b = proxied_pair(make_cage, make_proxy, sink)
    incoming = count_incoming(b)
    rnd = random.Random(SEED)
    per_round, total_rounds = 100, rounds(40, 400)
    ids: list[str] = []
    values: list[int] = []
    fired_cuts = 0
    for round_number in range(total_rounds):
        with a.transaction() as xa:
            for value in range(len(values), len(values) + per_round):
                xa.on("b_queue").sink.record(value)
                values.append(value)
        ids += xa.call_ids
        fired = None
        if round_number:  # round 0 measures the traffic a round makes
            direction: Direction = rnd.choice(("up", "down"))
            span = max(16, (proxy.counters[direction] * 3) // (2 * round_number))
            fired = proxy.cut_after(direction, rnd.randrange(span), reset=rnd.random() < 0.5)
        assert a.store is not None
        wait_until(partial(cut_or_delivered, a, fired),
                   f"round {round_number}: the calls were neither delivered nor cut")
        proxy.disarm()
        fired_cuts += bool(fired is not None and fired.is_set())
    settle_both(a, b)
    assert a.store is not None and a.store.pending("b_queue", outbound=True) == 0
    sink.check_exactly_once(ids, values)
    stats = b.stats()
    assert stats["counters"]["accepted"] == len(ids)
    assert stats["counters"]["refused"] == 0 and stats["dead"] == 0
    assert a.stats()["dead"] == 0 and a.stats()["counters"]["completed"] == len(ids)
    assert a.transport is not None
    assert a.transport.counters["sent"] >= incoming["calls"] >= len(ids)
    # The cuts made the link reconnect; resent calls that B had already were dropped by B.
    assert fired_cuts >= total_rounds // 5, f"only {fired_cuts} cuts fired"
    assert proxy.counters["connections"] > fired_cuts


def test_a_redelivered_batch_is_dropped_by_the_receiver(
    make_cage: Callable[..., pmq.Cage], make_proxy: Callable[[tuple[str, int]], TcpProxy],
) -> None:
    """B stores a batch whose ACK is lost with the connection; A resends it; B drops the copy."""
    sink = Sink()
    a, proxy, b = proxied_pair(make_cage, make_proxy, sink)
    incoming = count_incoming(b)
    assert a.execute.on("b", timeout=LIMIT_S).sink.echo(0) == 0  # the link is up
    ids: list[str] = []
    attempt = 0
    # Whether A resends depends on a race (B's first ACK on the new connection may reach A
    # before A sends again), so try until B has seen copies, a few times at least.
    while attempt < rounds(3, 50) or (incoming["calls"] == len(ids) and attempt < 100):
        accepted = b.stats()["counters"]["accepted"]
        # Everything B says is held back: its ACK of the batch never reaches A.
        fired = proxy.cut_after("down", 0, reset=True)
        with a.transaction() as xa:
            for value in range(attempt * 10, attempt * 10 + 10):
                xa.on("b_queue").sink.record(value)
        ids += xa.call_ids
        wait_until(lambda: b.stats()["counters"]["accepted"] == accepted + 10,  # noqa: B023
                   "B accepting the batch")
        wait_until(fired.is_set, "the cut of B's ACK")
        settle_both(a, b)
        attempt += 1
    sink.check_exactly_once(ids, list(range(len(ids))))
    assert b.stats()["counters"]["accepted"] == len(ids)
    assert incoming["calls"] > len(ids), "A never sent a call again: nothing was tested"


def test_rpc_through_a_stalled_link_times_out_then_works_again(
    make_cage: Callable[..., pmq.Cage], make_proxy: Callable[[tuple[str, int]], TcpProxy],
) -> None:
    """A stalled link makes RPC raise pmq.Timeout; queued calls wait; all flows after it."""
    sink = Sink()
    a, proxy, b = proxied_pair(make_cage, make_proxy, sink)
    assert a.execute.on("b", timeout=LIMIT_S).sink.echo("up") == "up"
    with proxy.stalled():
        with pytest.raises(pmq.Timeout, match="did not answer"):
            a.execute.on("b", timeout=0.5).sink.echo("stalled")
        ids = [a.execute.on("b_queue").sink.record(value) for value in range(50)]
        with pytest.raises(pmq.Timeout):
            a.execute.on("b", timeout=0.2).sink.echo("still stalled")
    assert a.execute.on("b", timeout=LIMIT_S).sink.echo("again") == "again"
    settle_both(a, b)
    sink.check_exactly_once(ids, list(range(50)))


def test_tiny_pieces_and_delayed_chunks_change_nothing(
    make_cage: Callable[..., pmq.Cage], make_proxy: Callable[[tuple[str, int]], TcpProxy],
) -> None:
    """Every write split into 1..7-byte pieces, each chunk delayed: calls and RPC still work."""
    sink = Sink()
    a, proxy, b = proxied_pair(make_cage, make_proxy, sink)
    rnd = random.Random(SEED)
    ids: list[str] = []
    values: list[int] = []
    for step in range(rounds(6, 60)):
        proxy.split = rnd.randint(1, 7)
        proxy.delay = rnd.choice((0.0, 0.001, 0.01))
        if step % 3 == 2:  # a fresh connection whose handshake goes through in pieces too
            connections = proxy.counters["connections"]
            proxy.sever_all(reset=step % 2 == 0)
            # RPC is not retried over a new connection: wait until A has one.
            wait_until(reconnected(a, proxy, connections), "A connecting again")
        with a.transaction() as xa:
            for value in range(len(values), len(values) + 50):
                xa.on("b_queue").sink.record(value)
                values.append(value)
        ids += xa.call_ids
        blob = os.urandom(rnd.randint(0, 3000))
        assert a.execute.on("b", timeout=LIMIT_S).sink.echo(blob) == blob
    settle_both(a, b)
    sink.check_exactly_once(ids, values)


def test_no_ack_covers_calls_that_are_not_durable_on_the_receiver_yet(
    make_cage: Callable[..., pmq.Cage], make_proxy: Callable[[tuple[str, int]], TcpProxy],
) -> None:
    """B acknowledges calls only once they are on its disk, also on a new connection.

    B's fsyncs are held back; B has stored A's calls in memory, not durably, when the link is
    cut. A connects again: B must not tell it those calls are accepted (A would forget them,
    and a crash of B would lose them) until its fsync is done.
    """
    sink = Sink()
    a, proxy, b = proxied_pair(make_cage, make_proxy, sink)
    assert b.store is not None and a.store is not None
    assert a.execute.on("b", timeout=LIMIT_S).sink.echo(0) == 0
    gated = GatedJournal(b.store.journal)
    b.store.journal = gated  # type: ignore[assignment]
    try:
        gated.open.clear()
        with a.transaction() as xa:
            for value in range(10):
                xa.on("b_queue").sink.record(value)
        wait_until(lambda: b.stats()["counters"]["accepted"] == 10, "B storing the calls")
        stored = gated.journal.next_seq - 1
        connections = proxy.counters["connections"]
        proxy.sever_all()
        wait_until(reconnected(a, proxy, connections), "A connecting again")
        # An answer comes after whatever B sent first on this connection (its first ACK). B may
        # also hold everything back until its fsync: then the RPC times out, which is fine.
        try:
            assert a.execute.on("b", timeout=2.0).sink.echo(1) == 1
        except pmq.Timeout:
            pass
        not_durable = gated.journal.durable_seq < stored
        acknowledged = 10 - a.store.outstanding()
        assert not (not_durable and acknowledged), (
            f"B acknowledged {acknowledged} calls that are not durable on it yet (its journal "
            f"is durable up to seq {gated.journal.durable_seq}, the calls end at {stored})")
    finally:
        gated.open.set()
        b.store.journal = gated.journal
    settle_both(a, b)
    sink.check_exactly_once(list(xa.call_ids), list(range(10)))


def test_stop_returns_while_the_link_is_busy(
    make_cage: Callable[..., pmq.Cage], tmp_path: Path,
) -> None:
    """Cage.stop() returns, whatever the link to a peer is doing when it is called."""
    sink = Sink()
    b = make_cage("b", listen="127.0.0.1:0", expose={"sink": sink})
    rnd = random.Random(SEED)
    for attempt in range(rounds(20, 500)):
        # Not through make_cage: a cage whose stop() hung would hang the fixture's teardown.
        a = pmq.Cage("a", data_dir=tmp_path / "a", peers={"b": peer_address(b)},
                     segment_bytes=SEGMENT_BYTES)
        a.start()
        loop = a._loop
        done = threading.Event()

        def produce(cage: pmq.Cage = a, done: threading.Event = done) -> None:
            try:
                while not done.is_set():
                    cage.execute.on("b_queue").sink.record(0)
            except (RuntimeError, pmq.PmqError):
                pass  # the cage stopped under it

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        time.sleep(rnd.random() * 0.05)  # stop at a different moment of the link each time
        stopper = threading.Thread(target=a.stop, daemon=True)
        stopper.start()
        stopper.join(LIMIT_S / 3)
        done.set()
        producer.join(LIMIT_S)
        if stopper.is_alive():
            stuck = []
            assert loop is not None
            for task in list(asyncio.all_tasks(loop)):
                if task.cancelling():
                    frames = task.get_stack()
                    where = f"{frames[-1].f_code.co_name}:{frames[-1].f_lineno}" if frames else "?"
                    stuck.append(f"{task.get_name()} in {where}")
            raise AssertionError(f"attempt {attempt}: Cage.stop() did not return within "
                                 f"{LIMIT_S / 3} s; tasks cancelled but still running: {stuck}")


def batch_then_eof(make_cage: Callable[..., pmq.Cage]) -> tuple[pmq.Cage, bytes]:
    """B, and a peer that did a handshake, sent a BATCH of 3 calls and closed its side; with
    what the peer received from B."""
    sink = Sink()
    b = make_cage("b", listen="127.0.0.1:0", expose={"sink": sink})
    with RawClient(address_of(b)) as client:
        conn = client.handshake("lone", None)
        assert conn is not None
        client.send(conn.send(protocol.Batch(0, [protocol.WireCall(*wire_call(key, key))
                                                 for key in (1, 2, 3)])))
        client.half_close()
        client.expect_closed()
    b.drain(timeout=LIMIT_S)
    assert sink.by_value == Counter({1: 1, 2: 1, 3: 1})
    return b, bytes(client.received)


def test_a_peer_that_closes_after_a_batch_is_not_taken_for_a_bad_peer(
    make_cage: Callable[..., pmq.Cage], caplog: pytest.LogCaptureFixture,
) -> None:
    """A clean close right after a BATCH is no protocol violation: no rejection, no warning."""
    b, _ = batch_then_eof(make_cage)
    assert b.transport is not None
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "pmq.transport" and r.levelno >= logging.WARNING]
    assert b.transport.counters["rejected_connections"] == 0 and not warnings, warnings


def test_a_peer_that_closes_after_a_batch_still_gets_its_ack(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """After the peer's EOF, B still acknowledges what arrived before it (a half-closed peer
    can read it; transport.py: "the acknowledgements of what arrived before the close")."""
    _, received = batch_then_eof(make_cage)
    assert last_message(received)[:2] == [4, 3], (
        f"B's last frame is {last_message(received)!r}, not ACK 3")


class Bystander:
    """Cage B listening, and a well-behaved cage A sending it queued calls and RPCs all along.

    ``finish()`` stops A's traffic and checks it: every queued call ran on B exactly once, every
    RPC answered, A's single connection never dropped, and B stored nothing but A's calls.
    """

    def __init__(self, make_cage: Callable[..., pmq.Cage], secret: bytes | None) -> None:
        self.secret = secret
        self.sink = Sink()
        self.b = make_cage("b", listen="127.0.0.1:0", secret=secret, expose={"sink": self.sink})
        self.address = address_of(self.b)
        self.a = make_cage("a", peers={"b": peer_address(self.b)}, secret=secret)
        self.raw_connections = 0
        self.ids: list[str] = []
        self.values: list[int] = []
        self.rpcs = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        assert self.a.execute.on("b", timeout=LIMIT_S).sink.echo(-1) == -1  # A is connected
        self._thread = threading.Thread(target=self._traffic, name="bystander", daemon=True)
        self._thread.start()

    def _traffic(self) -> None:
        value = 0
        try:
            while not self._stop.is_set():
                self.ids.append(self.a.execute.on("b_queue").sink.record(value))
                self.values.append(value)
                if value % 4 == 0:
                    assert self.a.execute.on("b", timeout=LIMIT_S).sink.echo(value) == value
                    self.rpcs += 1
                value += 1
                self._stop.wait(0.002)
        except BaseException as exc:  # reported by finish()
            self.errors.append(exc)

    def rejected(self) -> int:
        assert self.b.transport is not None
        return self.b.transport.counters["rejected_connections"]

    def connect(self) -> RawClient:
        self.raw_connections += 1
        return RawClient(self.address)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(LIMIT_S)

    def finish(self) -> None:
        self.stop()
        assert not self._thread.is_alive(), "A's traffic hung"
        assert not self.errors, f"A's traffic failed: {self.errors[0]!r}"
        assert self.values and self.rpcs
        settle_both(self.a, self.b)
        self.sink.check_exactly_once(self.ids, self.values)
        assert self.sink.sources == {"a"}
        assert self.b.store is not None and self.b.transport is not None
        assert set(self.b.store.queue_names()) == {"a_queue"}
        assert self.b.store.queue_names(outbound=True) == []
        counters = self.b.stats()["counters"]
        assert counters["accepted"] == len(self.ids)
        assert counters["refused"] == counters["duplicates"] == 0
        assert self.b.stats()["dead"] == 0
        # A connected once and was never dropped: every other connection was one of ours.
        assert self.b.transport.counters["connections"] == 1 + self.raw_connections


@pytest.fixture(params=[None, SECRET], ids=["no-secret", "secret"])
def bystander(request: pytest.FixtureRequest,
              make_cage: Callable[..., pmq.Cage]) -> Iterator[Bystander]:
    """B (with and without a secret) and A's background traffic; the test calls finish()."""
    bystander = Bystander(make_cage, request.param)
    yield bystander
    bystander.stop()  # before the cages stop, also when the test failed


class RawClient:
    """A plain socket to B, as a misbehaving peer would open it; ``received`` keeps all B sent."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=LIMIT_S)
        self.received = bytearray()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send ``data``; B may have closed already (then the rest is moot)."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def half_close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def recv(self) -> bytes:
        """What B sends next; b"" once it closed the connection (EOF or reset)."""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return b""
        except TimeoutError:
            raise AssertionError(f"B neither spoke nor closed the connection within {LIMIT_S} "
                                 f"s (it sent {bytes(self.received)[:200]!r})") from None
        self.received += data
        return data

    def expect_closed(self) -> None:
        """Read until B closes the connection; fail if it never does."""
        while self.recv():
            pass

    def handshake(self, name: str, secret: bytes | None, *, strict: bool = True
                  ) -> protocol.Connection | None:
        """Do a handshake as cage ``name``, as a real cage would.

        Returns:
            The Connection, to encode messages with, once Established; None (unless
            ``strict``, which fails the test instead) when the handshake failed either way.
        """
        conn = protocol.Connection("client", name, os.urandom(16), secret=secret,
                                   expect_peer="b")
        self.send(conn.initiate())
        while True:
            try:
                event = conn.next_event()
            except (pmq.AuthenticationError, pmq.ProtocolError):
                if strict:
                    raise
                self.send(conn.data_to_send())  # our AUTH, so that B judges it
                return None
            reply = conn.data_to_send()
            if reply:
                self.send(reply)
            if event is protocol.NEED_DATA:
                data = self.recv()
                assert data or not strict, "B closed the connection during a valid handshake"
                conn.receive_data(data)
            elif isinstance(event, protocol.Established):
                return conn
            elif isinstance(event, protocol.Goodbye | protocol.ConnectionClosed):
                assert not strict, f"B refused a valid handshake: {event}"
                return None


def last_message(data: bytes | bytearray) -> list[Any]:
    """The last whole frame's message in ``data`` (the frames B sent)."""
    offset, message = 0, []
    while offset + 4 <= len(data):
        (size,) = struct.unpack_from(">I", data, offset)
        if offset + 4 + size > len(data):
            break
        message = msgpack.unpackb(data[offset + 4:offset + 4 + size], raw=False)
        offset += 4 + size
    return message


def frame(message: Any) -> bytes:
    """A frame: the 4-byte big-endian length, then the msgpack body (bytes as bin)."""
    body = message if isinstance(message, bytes) else msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def hello(name: str = "intruder", uses_secret: object = False, **changes: Any) -> list[Any]:
    """A HELLO message, with fields replaced by ``changes`` (by name)."""
    fields = {"kind": 1, "version": protocol.PROTOCOL_VERSION, "cage": name,
              "journal_id": os.urandom(16), "nonce": os.urandom(32), "uses_secret": uses_secret,
              "window_calls": 100, "window_bytes": 1 << 20}
    fields.update(changes)
    return list(fields.values())


def wire_call(key: int, value: int = 0) -> list[Any]:
    """One BATCH call to B's sink.record(value)."""
    return [key, "sink", "record", pack_arguments((value,), {}), None, None, 1.0]


ZERO_LENGTH = b"\0\0\0\0"  # a frame header no body may have: always refused

#: (name, the bytes to send before any handshake, given whether B uses a secret); B must close
#: each such connection by itself, without waiting for more.
BEFORE_HANDSHAKE: list[tuple[str, Callable[[bool], bytes]]] = [
    ("huge length", lambda s: b"\xff\xff\xff\xff" + b"x" * 16),
    ("length over the frame limit",
     lambda s: struct.pack(">I", protocol.DEFAULT_MAX_FRAME_BYTES + 1)),
    ("zero length", lambda s: ZERO_LENGTH),
    ("deep nesting", lambda s: frame(b"\x91" * 20_000 + b"\xc0")),
    ("deep nesting in a HELLO field",
     lambda s: frame(b"\x98\x01" + b"\x91" * 20_000 + b"\xc0" * 6)),
    ("not msgpack", lambda s: frame(b"\xc1\xc1\xc1")),
    ("trailing bytes after a HELLO body",
     lambda s: frame(msgpack.packb(hello(uses_secret=s)) + b"\x00")),
    ("a map, not an array", lambda s: frame({"kind": 1})),
    ("an empty array", lambda s: frame([])),
    ("unknown message type", lambda s: frame([99])),
    ("message type as a bool", lambda s: frame([True])),
    ("string longer than its body", lambda s: frame(b"\x92\x01\xdb\xff\xff\xff\xff")),
    ("array longer than its body", lambda s: frame(b"\xdd\x7f\xff\xff\xff\x01")),
    ("msgpack extension type", lambda s: frame([1, msgpack.ExtType(1, b"x")])),
    ("HELLO with version 2", lambda s: frame(hello(uses_secret=s, version=2))),
    ("HELLO with version as a str", lambda s: frame(hello(uses_secret=s, version="1"))),
    ("HELLO with cage name as an int", lambda s: frame(hello(uses_secret=s, cage=7))),
    ("HELLO with an invalid cage name",
     lambda s: frame(hello(uses_secret=s, cage="no spaces allowed"))),
    ("HELLO with a cage name ending in _queue",
     lambda s: frame(hello(uses_secret=s, cage="x_queue"))),
    ("HELLO with a cage name of 33 chars", lambda s: frame(hello(uses_secret=s, cage="x" * 33))),
    ("HELLO with a 15-byte journal id",
     lambda s: frame(hello(uses_secret=s, journal_id=b"j" * 15))),
    ("HELLO with journal id as a str",
     lambda s: frame(hello(uses_secret=s, journal_id="j" * 16))),
    ("HELLO with nonce as nil", lambda s: frame(hello(uses_secret=s, nonce=None))),
    ("HELLO with uses_secret as an int", lambda s: frame(hello(uses_secret=int(s)))),
    ("HELLO with the other uses_secret", lambda s: frame(hello(uses_secret=not s))),
    ("HELLO with window_calls 0", lambda s: frame(hello(uses_secret=s, window_calls=0))),
    ("HELLO with window_bytes -1", lambda s: frame(hello(uses_secret=s, window_bytes=-1))),
    ("HELLO with window_calls a float",
     lambda s: frame(hello(uses_secret=s, window_calls=100.0))),
    ("HELLO with window_bytes 2**64-1",
     lambda s: frame(hello(uses_secret=s, window_bytes=2**64 - 1))),
    ("HELLO with a missing field", lambda s: frame(hello(uses_secret=s)[:-1])),
    ("HELLO with an extra field", lambda s: frame([*hello(uses_secret=s), 0])),
    ("HELLO twice", lambda s: frame(hello(uses_secret=s)) * 2),
    ("AUTH before HELLO", lambda s: frame([2, b"p" * 32])),
    ("BATCH before the handshake", lambda s: frame([3, 0, [wire_call(1, 10_000)]])),
    ("BATCH right after the HELLO",
     lambda s: frame(hello(uses_secret=s)) + frame([3, 0, [wire_call(1, 10_000)]])
     if s else frame(hello(uses_secret=s)) + frame([3, 0, [wire_call(1, 10_000)[:-1]]])),
    ("ACK before the handshake", lambda s: frame([4, 0, []])),
    ("REQUEST before the handshake",
     lambda s: frame([5, 1, "sink", "echo", pack_arguments((1,), {}), None])),
    ("PING before the handshake", lambda s: frame([7])),
    ("GOODBYE before the handshake", lambda s: frame([9, "no thanks"])),
]


def test_bad_input_before_the_handshake_closes_that_connection_only(
    bystander: Bystander, caplog: pytest.LogCaptureFixture,
) -> None:
    """Malformed, oversized or out-of-order input before the handshake: B closes at once,
    says why in a GOODBYE and logs a warning naming the connection."""
    uses_secret = bystander.secret is not None
    for case, make in BEFORE_HANDSHAKE:
        rejected = bystander.rejected()
        with bystander.connect() as client:
            host, port = client.sock.getsockname()[:2]
            where = f"{host}:{port}"
            client.send(make(uses_secret))
            client.expect_closed()
        assert bystander.rejected() == rejected + 1, case
        assert last_message(client.received)[0] == 9, f"{case}: B closed without a GOODBYE"
        logged = [r for r in caplog.records if r.name == "pmq.transport"
                  and r.levelno == logging.WARNING and where in r.getMessage()]
        assert len(logged) == 1, f"{case}: {len(logged)} warnings name {where}"
    assert 10_000 not in bystander.sink.by_value
    bystander.finish()


def test_every_truncation_of_a_hello_then_eof_closes_the_connection(
    bystander: Bystander,
) -> None:
    """Every prefix of a good HELLO, then EOF: B closes that connection; A is unharmed."""
    good = frame(hello("intruder", uses_secret=bystander.secret is not None))
    for cut in range(len(good)):
        with bystander.connect() as client:
            client.send(good[:cut])
            client.half_close()
            client.expect_closed()
    bystander.finish()


# The handshake timeout is the same code with a secret or without: the default run waits once.
@pytest.mark.parametrize("bystander", [None, pytest.param(SECRET, marks=pytest.mark.torture)],
                         ids=["no-secret", "secret"], indirect=True)
def test_an_unfinished_handshake_is_closed_by_the_handshake_timeout(
    bystander: Bystander,
) -> None:
    """A peer that sends half a HELLO and then nothing loses its connection (no EOF needed)."""
    good = frame(hello("intruder"))
    with bystander.connect() as client:
        client.send(good[:10])
        client.expect_closed()
    bystander.finish()


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats() | st.text(max_size=40) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
#: Cage names a bad peer may claim: a stranger, the well-behaved A, and B itself.
claimed_names = st.sampled_from(["intruder", "a", "b"])
HELLO_FIELDS = ["version", "cage", "journal_id", "nonce", "uses_secret", "window_calls",
                "window_bytes"]


@dataclass(frozen=True)
class Plan:
    """What one bad connection does: an optional HELLO first, then ``payload``, then maybe EOF.

    ``handshake`` is None (just the payload), "hello" (our HELLO, then the payload at once: with
    a secret, where B waits for AUTH) or "complete" (a real handshake, then the payload).
    """

    payload: bytes
    half_close: bool = False
    handshake: str | None = None
    name: str = "intruder"


def random_plans(uses_secret: bool) -> dict[str, st.SearchStrategy[Plan]]:
    """Strategies of bad connections, by kind; each ends so that B must close it.

    A payload that could be the start of a valid frame is followed by EOF; a frame that could
    by chance be valid is followed by a zero-length header, which never is.
    """

    def hello_with(field: str, value: Any, name: str) -> Plan:
        changes = {"uses_secret": uses_secret, field: value}
        return Plan(frame(hello(name, **changes)) + ZERO_LENGTH)

    return {
        "bytes then EOF": st.builds(Plan, st.binary(max_size=512), st.just(True)),
        "framed random bodies": st.builds(
            lambda body: Plan(frame(body) + ZERO_LENGTH),
            st.binary(min_size=1, max_size=300)
            | st.builds(lambda kind, rest: msgpack.packb([kind, *rest]),
                        st.integers(min_value=-1, max_value=12),
                        st.lists(msgpack_values, max_size=9))),
        "HELLO with a field of any type": st.builds(
            hello_with, st.sampled_from(HELLO_FIELDS), msgpack_values, claimed_names),
        "garbage after a HELLO": st.builds(
            Plan, st.binary(min_size=1, max_size=300), st.just(True),
            st.sampled_from(["hello", "complete"]), claimed_names),
    }


def run_plan(bystander: Bystander, plan: Plan) -> None:
    """Carry out ``plan`` on a fresh connection to B; B must close it."""
    with bystander.connect() as client:
        if plan.handshake == "complete":
            client.handshake(plan.name, bystander.secret)
        elif plan.handshake == "hello":
            client.send(frame(hello(plan.name, uses_secret=bystander.secret is not None)))
        client.send(plan.payload)
        if plan.half_close:
            client.half_close()
        client.expect_closed()


def check_random_plans(bystander: Bystander, plans: st.SearchStrategy[Plan],
                       examples: int) -> None:
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(plans)
    def check(plan: Plan) -> None:
        run_plan(bystander, plan)

    check()
    bystander.finish()


@pytest.mark.parametrize("kind", list(random_plans(False)))
def test_random_bad_input_closes_that_connection_only(bystander: Bystander, kind: str) -> None:
    """Random bytes, bodies, HELLO fields, garbage after a HELLO: B closes; A is unharmed."""
    plans = random_plans(bystander.secret is not None)[kind]
    check_random_plans(bystander, plans, rounds(100, 1_000))


# make torture: 100,000 random bad connections with a secret and 100,000 without, in parts of
# 25,000 so that no single test runs for many minutes.
@pytest.mark.torture
@pytest.mark.parametrize("part", range(4))
def test_torture_random_bad_input(bystander: Bystander, caplog: pytest.LogCaptureFixture,
                                  part: int) -> None:
    """25,000 random bad connections of every kind, a quarter of make torture's 100,000."""
    caplog.set_level(logging.ERROR, logger="pmq.transport")  # not 25,000 warnings in memory
    plans = st.one_of(*random_plans(bystander.secret is not None).values())
    check_random_plans(bystander, plans, 25_000)


def after_handshake() -> list[tuple[str, bytes]]:
    """(name, bytes) a peer that completed the handshake must not send."""
    calls = [wire_call(key, 10_000 + key) for key in range(1, 4)]
    too_many = [wire_call(key, 0) for key in range(1, protocol.DEFAULT_WINDOW_CALLS + 2)]
    return [
        ("ACK sent to the listener", frame([4, 0, []])),
        ("RESPONSE to no REQUEST", frame([6, 7, True, b"\x90"])),
        ("a second HELLO", frame(hello())),
        ("AUTH after the handshake", frame([2, b"p" * 32])),
        ("garbage", b"\x00\x00\x00\x03\xc1\xc1\xc1"),
        ("huge length", b"\xff\xff\xff\xff"),
        ("BATCH with a bad call after good ones",
         frame([3, 0, [*calls, [4, "sink", "record", "not bytes", None, None, 1.0]]])),
        ("BATCH with keys going down", frame([3, 0, [calls[1], calls[0]]])),
        ("BATCH with a key of 2**63", frame([3, 0, [wire_call(2**63)]])),
        ("BATCH with a private method", frame([3, 0, [[1, "sink", "_lock", b"", None, None,
                                                      1.0]]])),
        ("BATCH over the window", frame([3, 0, too_many])),
        ("GOODBYE, then a BATCH", frame([9, "bye"]) + frame([3, 0, calls])),
        ("REQUEST with a negative timeout", frame([5, 1, "sink", "echo", b"\x92\x90\x80",
                                                   -1.0])),
    ]


def test_bad_messages_after_the_handshake_close_the_connection_and_store_nothing(
    bystander: Bystander,
) -> None:
    """After a good handshake, each bad message closes that connection and stores nothing."""
    for case, data in after_handshake():
        rejected = bystander.rejected()
        with bystander.connect() as client:
            client.handshake("intruder", bystander.secret)
            client.send(data)
            client.expect_closed()
        if not case.startswith("GOODBYE"):  # a GOODBYE is a clean close, not a rejection
            assert bystander.rejected() == rejected + 1, case
            assert last_message(client.received)[0] == 9, case
    assert bystander.sink.by_value.keys().isdisjoint(range(10_000, 10_004))
    bystander.finish()


def test_a_wrong_secret_or_a_missing_one_is_refused(bystander: Bystander) -> None:
    """A peer whose secret differs (or who has none while B has one) cannot get in."""
    cases: list[tuple[str, bytes | None]] = [("wrong", b"not-the-secret")]
    if bystander.secret is not None:
        cases.append(("none", None))
    for _, secret in cases:
        rejected = bystander.rejected()
        with bystander.connect() as client:
            assert client.handshake("intruder", secret, strict=False) is None
            client.expect_closed()
        assert bystander.rejected() == rejected + 1
        message = last_message(client.received)  # B said why before closing
        assert message[0] == 9 and "secret" in message[1], message
    if bystander.secret is not None:
        # The HMAC proof itself: the right HELLO, then an AUTH with a wrong proof, and then
        # the BATCH a peer might send hoping B does not wait for the proof.
        for proof in (b"\0" * 32, os.urandom(32), b"short"):
            rejected = bystander.rejected()
            with bystander.connect() as client:
                client.send(frame(hello("intruder", uses_secret=True)))
                client.send(frame([2, proof]) + frame([3, 0, [wire_call(1, 10_000)]]))
                client.expect_closed()
            assert bystander.rejected() == rejected + 1
        with bystander.connect() as client:  # BATCH instead of AUTH
            client.send(frame(hello("intruder", uses_secret=True)))
            client.send(frame([3, 0, [wire_call(1, 10_000)]]))
            client.expect_closed()
    assert 10_000 not in bystander.sink.by_value
    bystander.finish()


@pytest.mark.torture
def test_torture_many_bad_connections_at_once(bystander: Bystander) -> None:
    """Many raw connections open at the same time, each misbehaving: B closes them all."""
    clients = [bystander.connect() for _ in range(200)]
    try:
        for index, client in enumerate(clients):
            make = BEFORE_HANDSHAKE[index % len(BEFORE_HANDSHAKE)][1]
            client.send(make(bystander.secret is not None))
        for client in clients:
            client.expect_closed()
    finally:
        for client in clients:
            client.sock.close()
    bystander.finish()


# ---- 3. a cage that B does not list --------------------------------------------------------


def test_a_cage_b_does_not_list_may_call_it_with_the_right_secret(
    make_cage: Callable[..., pmq.Cage],
) -> None:
    """B takes calls from any cage that knows the secret: they land in "<name>_queue"."""
    sink = Sink()
    b = make_cage("b", listen="127.0.0.1:0", secret=SECRET, expose={"sink": sink})
    stranger = make_cage("stranger-1", peers={"b": peer_address(b)}, secret=SECRET)
    ids = [stranger.execute.on("b_queue").sink.record(value) for value in range(20)]
    assert stranger.execute.on("b", timeout=LIMIT_S).sink.echo("hi") == "hi"
    settle_both(stranger, b)
    sink.check_exactly_once(ids, list(range(20)))
    assert sink.by_queue == Counter({"stranger-1_queue": 20})
    assert sink.sources == {"stranger-1"}
    assert b.store is not None
    assert b.store.queue_names() == ["stranger-1_queue"]
    assert b.stats()["counters"]["accepted"] == 20
