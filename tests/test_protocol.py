"""The wire protocol (pmq.protocol): frames, handshake, flow control, and what hostile peers send.

What must hold (the module docstring of pmq.protocol):
- every message that ``send`` accepts arrives unchanged, whole, byte by byte or in any split;
- the handshake completes without a secret and with the same secret on both ends, and fails with
  ``AuthenticationError`` on both ends for a wrong secret, a secret on one side only or a
  reflected or replayed proof;
- anything malformed, oversized, out of order or over the window raises ``RemoteProtocolError``
  (never ``KeyError``, ``IndexError``, ``TypeError``...), and the connection then stays failed;
- ``send`` refuses with ``LocalProtocolError`` what the peer would refuse, and changes nothing.

Two Connections talk in memory through ``Pair`` (h11's ConnectionPair); hostile bytes are made
with ``frame()`` from plain msgpack. Nothing here depends on timing.
"""

from __future__ import annotations

import gc
import itertools
import keyword
import math
from collections.abc import Callable
from dataclasses import astuple
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import rounds
from pmq.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from pmq.protocol import (
    DEFAULT_WINDOW_BYTES,
    DEFAULT_WINDOW_CALLS,
    HANDSHAKE_MAX_FRAME_BYTES,
    MAX_CONCURRENT_REQUESTS,
    MAX_REFUSED,
    MAX_STR_CHARS,
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    Batch,
    Connection,
    ConnectionClosed,
    Established,
    Event,
    Goodbye,
    Ping,
    Pong,
    Request,
    Response,
    SendEvent,
    WireCall,
)

CLIENT_ID, SERVER_ID = bytes(range(16)), bytes(range(16, 32))
CLIENT_NONCE, SERVER_NONCE = b"c" * 32, b"s" * 32
SECRET = b"correct horse battery staple"
EVENT_TYPES = (Established, Batch, Ack, Request, Response, Ping, Pong, Goodbye, ConnectionClosed)


def frame(message: Any) -> bytes:
    """A frame holding ``message`` as msgpack, whatever it is: the way to forge hostile input."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def raw_frame(body: bytes) -> bytes:
    """A frame holding ``body`` as it is (invalid msgpack included)."""
    return len(body).to_bytes(4, "big") + body


def drain(conn: Connection) -> list[Event]:
    """Every event ``conn`` can give now, up to NEED_DATA or ConnectionClosed."""
    events: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert isinstance(event, EVENT_TYPES)
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return events


def feed(conn: Connection, data: bytes, cuts: list[int] | None = None) -> list[Event]:
    """Hand ``data`` to ``conn`` in pieces cut at ``cuts`` (any ints), draining after each."""
    points = sorted({cut % (len(data) + 1) for cut in cuts or []} | {0, len(data)})
    events: list[Event] = []
    for start, end in itertools.pairwise(points):
        conn.receive_data(data[start:end])
        events += drain(conn)
    return events


def client(**kwargs: Any) -> Connection:
    """A client Connection named 'alpha' with a fixed nonce."""
    return Connection("client", "alpha", CLIENT_ID, nonce=CLIENT_NONCE, **kwargs)


def server(**kwargs: Any) -> Connection:
    """A server Connection named 'beta' with a fixed nonce."""
    return Connection("server", "beta", SERVER_ID, nonce=SERVER_NONCE, **kwargs)


class Pair:
    """A client and a server wired together in memory; bytes move only when asked to."""

    def __init__(self, client_kwargs: dict[str, Any] | None = None, **server_kwargs: Any) -> None:
        self.client = client(**(client_kwargs or {}))
        self.server = server(**server_kwargs)

    def other(self, conn: Connection) -> Connection:
        """The other end of ``conn``."""
        return self.server if conn is self.client else self.client

    def pump(self, inbox: dict[Connection, bytes]) -> dict[Connection, list[Event]]:
        """Deliver ``inbox``, and whatever the protocol answers, until both ends are quiet."""
        seen: dict[Connection, list[Event]] = {self.client: [], self.server: []}
        while any(inbox.values()):
            for conn in (self.client, self.server):
                data, inbox[conn] = inbox.get(conn, b""), b""
                if data:
                    conn.receive_data(data)
                    seen[conn] += drain(conn)
                    other = self.other(conn)
                    inbox[other] = inbox.get(other, b"") + conn.data_to_send()
        return seen

    def handshake(self) -> dict[Connection, list[Event]]:
        """Both ends send HELLO at once; the events each end saw."""
        return self.pump({self.server: self.client.initiate(), self.client: self.server.initiate()})

    def send(self, sender: Connection, event: SendEvent) -> list[Event]:
        """``sender`` sends ``event``; what the other end saw."""
        return self.pump({self.other(sender): sender.send(event)})[self.other(sender)]


def open_pair(client_kwargs: dict[str, Any] | None = None, **server_kwargs: Any) -> Pair:
    """A Pair whose handshake is done."""
    pair = Pair(client_kwargs, **server_kwargs)
    pair.handshake()
    assert pair.client.state == pair.server.state == "open"
    return pair


def open_server(**kwargs: Any) -> Connection:
    """The server end of an open pair (no secret), to feed forged frames to."""
    return open_pair(**kwargs).server


def hello(**changes: Any) -> list[Any]:
    """The HELLO of client 'alpha', as a list, with ``changes`` by field name."""
    fields = {
        "version": PROTOCOL_VERSION,
        "cage": "alpha",
        "journal_id": CLIENT_ID,
        "nonce": CLIENT_NONCE,
        "uses_secret": False,
        "window_calls": 10,
        "window_bytes": 1000,
    } | changes
    return [1, *fields.values()]


def call(key: int = 1, **changes: Any) -> list[Any]:
    """One BATCH call as a list, with ``changes`` by field name."""
    fields = {
        "module": "ledger",
        "method": "transfer",
        "arguments": b"\x92\x90\x80",
        "user_id": None,
        "deadline": None,
        "created": 1.5,
    } | changes
    return [key, *fields.values()]


# Strategies

identifiers = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,20}", fullmatch=True).filter(
    lambda name: not keyword.iskeyword(name)
)
uints = st.integers(0, 2**63 - 1)
times = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
texts = st.text(max_size=40)
user_ids = st.none() | st.text(min_size=1, max_size=40).filter(str.isprintable)


@st.composite
def batches(draw: st.DrawFn, max_calls: int = 12) -> Batch:
    """A Batch of calls with strictly increasing keys."""
    keys = sorted(draw(st.sets(uints, max_size=max_calls)))
    calls = [
        WireCall(
            key,
            draw(identifiers),
            draw(identifiers),
            draw(st.binary(max_size=40)),
            draw(user_ids),
            draw(st.none() | times),
            draw(times),
        )
        for key in keys
    ]
    return Batch(draw(uints), calls)


@st.composite
def acks(draw: st.DrawFn) -> Ack:
    """An Ack whose refused keys are all at or below its high."""
    high = draw(uints)
    return Ack(high, draw(st.lists(st.tuples(st.integers(0, high), texts), max_size=5)))


requests = st.builds(Request, uints, identifiers, identifiers, st.binary(), st.none() | times)
responses = st.builds(Response, uints, st.just(True), st.binary(), st.none()) | st.builds(
    Response, uints, st.just(False), st.none(), st.tuples(texts, texts, texts)
)
messages = batches() | acks() | requests | responses | st.just(Ping()) | st.builds(Goodbye, texts)


def send_from(pair: Pair, event: SendEvent) -> tuple[Connection, bytes]:
    """Who sends ``event`` and its bytes: the server answers a REQUEST it got first."""
    if isinstance(event, Response):
        pair.send(pair.client, Request(event.rpc_id, "m", "f", b"", None))
        return pair.server, pair.server.send(event)
    return pair.client, pair.client.send(event)


# Handshake


def test_handshake_without_secret_establishes_both_ends() -> None:
    """HELLO both ways is enough; each end learns the other's name, journal id and window."""
    pair = Pair({"window_calls": 5, "window_bytes": 500}, window_calls=7, window_bytes=700)
    assert {pair.client.state, pair.server.state} == {"handshake"}
    seen = pair.handshake()
    assert seen[pair.server] == [Established("alpha", CLIENT_ID, 5, 500)]
    assert seen[pair.client] == [Established("beta", SERVER_ID, 7, 700)]
    assert (pair.client.peer, pair.client.peer_journal_id) == ("beta", SERVER_ID)
    assert (pair.client.peer_window_calls, pair.client.peer_window_bytes) == (7, 700)
    assert pair.client.state == pair.server.state == "open"
    assert pair.client.room() == (7, 700)


def test_handshake_with_secret_establishes_both_ends() -> None:
    """With the same secret, each end answers the HELLO with an AUTH and both get Established."""
    pair = Pair({"secret": SECRET, "expect_peer": "beta"}, secret=SECRET, expect_peer="alpha")
    seen = pair.handshake()
    window = (DEFAULT_WINDOW_CALLS, DEFAULT_WINDOW_BYTES)
    assert seen[pair.server] == [Established("alpha", CLIENT_ID, *window)]
    assert seen[pair.client] == [Established("beta", SERVER_ID, *window)]
    assert pair.client.peer == "beta" and pair.server.peer == "alpha"


def test_peer_is_unknown_and_room_is_zero_before_established() -> None:
    """Before the handshake completes, the peer fields are empty and no BATCH fits."""
    conn = client()
    assert (conn.peer, conn.peer_journal_id, conn.peer_window_calls) == ("", b"", 0)
    assert conn.room() == (0, 0) and conn.in_flight() == (0, 0)


def test_initiate_twice_raises_local_error() -> None:
    """There is one HELLO per connection."""
    conn = client()
    conn.initiate()
    with pytest.raises(LocalProtocolError, match="already"):
        conn.initiate()


def test_next_event_before_initiate_raises_local_error() -> None:
    """Our HELLO must go out before we read the peer's."""
    with pytest.raises(LocalProtocolError, match="initiate"):
        client().next_event()


def test_wrong_secret_fails_on_both_ends() -> None:
    """Each end finds the other's proof wrong; neither message shows a secret."""
    pair = Pair({"secret": b"one secret"}, secret=b"another secret")
    hello_c, hello_s = pair.client.initiate(), pair.server.initiate()
    pair.client.receive_data(hello_s)
    pair.server.receive_data(hello_c)
    assert drain(pair.client) == drain(pair.server) == []
    auth_c, auth_s = pair.client.data_to_send(), pair.server.data_to_send()
    errors = []
    for conn, data in ((pair.client, auth_s), (pair.server, auth_c)):
        conn.receive_data(data)
        with pytest.raises(AuthenticationError, match="wrong secret from peer") as caught:
            conn.next_event()
        errors.append(str(caught.value))
    assert "'beta'" in errors[0] and "'alpha'" in errors[1]
    assert not any("one secret" in error or "another secret" in error for error in errors)


@pytest.mark.parametrize("secret_side", ["client", "server"])
def test_secret_on_one_side_only_fails_on_both_ends(secret_side: str) -> None:
    """Both ends refuse, each saying which side has the secret and never what it is."""
    pair = Pair({"secret": SECRET}) if secret_side == "client" else Pair(secret=SECRET)
    hello_c, hello_s = pair.client.initiate(), pair.server.initiate()
    for conn, data in ((pair.client, hello_s), (pair.server, hello_c)):
        conn.receive_data(data)
        with pytest.raises(AuthenticationError) as caught:
            conn.next_event()
        message = str(caught.value)
        assert SECRET.decode() not in message
        has_secret = conn.role == secret_side
        assert ("this cage uses a secret" in message) == has_secret
        assert ("uses a secret, but this cage has none" in message) == (not has_secret)


def test_expect_peer_mismatch_fails_with_authentication_error() -> None:
    """A peer that names itself otherwise than expected is refused, naming both names."""
    pair = Pair(expect_peer="gamma")
    pair.server.initiate()
    pair.server.receive_data(pair.client.initiate())
    with pytest.raises(AuthenticationError, match="expected cage 'gamma', peer says it is 'alpha'"):
        pair.server.next_event()


def test_version_mismatch_names_both_versions() -> None:
    """A HELLO of another version, even with more fields, is refused for its version."""
    conn = server()
    conn.initiate()
    conn.receive_data(frame([*hello(version=2), "a field of version 2"]))
    with pytest.raises(RemoteProtocolError, match="version 2, this cage speaks version 1"):
        conn.next_event()


def test_reflected_auth_is_refused() -> None:
    """An AUTH sent back to the end that made it does not prove anything."""
    conn = client(secret=SECRET)
    conn.initiate()
    conn.receive_data(server(secret=SECRET).initiate())
    assert drain(conn) == []
    own_auth = conn.data_to_send()
    conn.receive_data(own_auth)
    with pytest.raises(AuthenticationError, match="wrong secret from peer 'beta'"):
        conn.next_event()


def test_replayed_auth_from_another_connection_is_refused() -> None:
    """An AUTH recorded on one connection fails on the next: the nonces differ."""
    first = Pair({"secret": SECRET}, secret=SECRET)
    hello_c = first.client.initiate()
    first.server.initiate()
    first.server.receive_data(hello_c)
    drain(first.server)
    recorded_auth = first.server.data_to_send()
    conn = Connection("client", "alpha", CLIENT_ID, secret=SECRET, nonce=b"n" * 32)
    conn.initiate()
    conn.receive_data(server(secret=SECRET).initiate() + recorded_auth)
    with pytest.raises(AuthenticationError, match="wrong secret"):
        conn.next_event()


def test_auth_before_hello_is_refused() -> None:
    """The proof means nothing before the HELLO that names the prover."""
    conn = server(secret=SECRET)
    conn.initiate()
    conn.receive_data(frame([2, b"p" * 32]))
    with pytest.raises(RemoteProtocolError, match="AUTH before HELLO"):
        conn.next_event()


def test_second_hello_is_refused() -> None:
    """A peer says who it is once."""
    conn = server(secret=SECRET)
    conn.initiate()
    conn.receive_data(frame(hello(uses_secret=True)) * 2)
    with pytest.raises(RemoteProtocolError, match="second HELLO"):
        conn.next_event()


def test_auth_without_secret_is_refused() -> None:
    """Without a secret the handshake ends with the HELLO; an AUTH after it is out of order."""
    conn = open_server()
    conn.receive_data(frame([2, b"p" * 32]))
    with pytest.raises(RemoteProtocolError, match="AUTH after the handshake"):
        conn.next_event()


@pytest.mark.parametrize(
    "message", [[3, 0, []], [4, 0, []], [5, 1, "m", "f", b"", None], [6, 1, True, b""], [7], [8]]
)
def test_messages_before_established_are_refused(message: list[Any]) -> None:
    """Only HELLO, AUTH and GOODBYE may come before the handshake completes."""
    conn = server(secret=SECRET)
    conn.initiate()
    conn.receive_data(frame(hello(uses_secret=True)) + frame(message))
    with pytest.raises(RemoteProtocolError, match="before the handshake completed"):
        conn.next_event()


def test_a_big_frame_before_the_handshake_is_refused_on_its_header() -> None:
    """Until the handshake completes a frame may hold at most HANDSHAKE_MAX_FRAME_BYTES: a
    stranger announcing more is refused on the 4 header bytes, before anything else arrives,
    so it cannot make the cage wait for (and buffer) a 16 MiB frame."""
    conn = server(secret=SECRET)
    conn.initiate()
    conn.receive_data((HANDSHAKE_MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError, match="before the handshake completed"):
        conn.next_event()
    # The same size after the handshake is an ordinary frame.
    pair = open_pair()
    memo = "x" * HANDSHAKE_MAX_FRAME_BYTES
    got = pair.send(pair.client, Batch(0, [WireCall(1, "m", "f", memo.encode(), None, None, 1.0)]))
    assert [len(event.calls) for event in got if isinstance(event, Batch)] == [1]


def test_goodbye_during_the_handshake_is_delivered() -> None:
    """A peer that refuses us mid-handshake can say why."""
    pair = Pair()
    pair.client.initiate()
    pair.server.initiate()
    pair.client.receive_data(pair.server.send(Goodbye("you are not on my list")))
    assert drain(pair.client) == [Goodbye("you are not on my list")]
    assert pair.client.state == pair.server.state == "closed"


# Round trips


def delivered(event: SendEvent, cuts: Callable[[bytes], list[int]]) -> list[Event]:
    """What the other end of a fresh pair gets for ``event``, its bytes cut at ``cuts(data)``."""
    pair = open_pair()
    sender, data = send_from(pair, event)
    return feed(pair.other(sender), data, cuts(data))


@given(event=messages, cuts=st.lists(st.integers(0, 10**6), max_size=8))
def test_every_message_round_trips_whole_byte_by_byte_and_split(
    event: SendEvent, cuts: list[int]
) -> None:
    """What send() accepts arrives equal, whole, byte by byte and split anywhere."""
    assert delivered(event, lambda data: []) == [event]
    assert delivered(event, lambda data: list(range(len(data)))) == [event]
    assert delivered(event, lambda data: cuts) == [event]


@given(events=st.lists(messages, max_size=6))
def test_several_frames_in_one_chunk_come_out_in_order(events: list[SendEvent]) -> None:
    """Frames glued together come out as separate events, in order."""
    pair = open_pair()
    numbers = iter(range(1, 10**6))  # keys and rpc ids that keep increasing
    sent: list[SendEvent] = []
    for event in events:
        if isinstance(event, Batch):
            event = Batch(0, [call._replace(key=next(numbers)) for call in event.calls])
        elif isinstance(event, Request):
            event = Request(next(numbers), *astuple(event)[1:])
        elif not isinstance(event, Ping):  # ACK highs, RESPONSE ids, GOODBYE have their rules
            continue
        sent.append(event)
    data = b"".join(pair.client.send(event) for event in sent)
    assert feed(pair.server, data) == sent


def test_int_times_are_accepted_as_seconds() -> None:
    """Deadlines, creation times and timeouts may arrive as ints."""
    conn = open_server()
    conn.receive_data(
        frame([3, 0, [call(deadline=10, created=0)]]) + frame([5, 1, "m", "f", b"", 3])
    )
    batch, request = drain(conn)
    assert isinstance(batch, Batch) and WireCall._make(batch.calls[0]).deadline == 10
    assert isinstance(request, Request) and request.timeout == 3


def test_batch_calls_arrive_as_plain_tuples_in_wire_call_order() -> None:
    """A received call is a plain tuple (which the garbage collector can stop tracking) with
    WireCall's fields in WireCall's order; WireCall._make names them."""
    pair = open_pair()
    got = pair.send(pair.client, Batch(4, [WireCall(9, "m", "f", b"a", "id/9", 2.0, 1.0)]))
    assert got == [Batch(4, [WireCall(9, "m", "f", b"a", "id/9", 2.0, 1.0)])]
    assert isinstance(got[0], Batch)
    received = got[0].calls[0]
    assert type(received) is tuple
    assert WireCall._make(received).user_id == "id/9"
    gc.collect()
    assert not gc.is_tracked(received)


# Bad frames


def test_empty_frame_is_refused() -> None:
    """A frame of length 0 is never sent by pmq."""
    conn = open_server()
    conn.receive_data(b"\0\0\0\0")
    with pytest.raises(RemoteProtocolError, match="frame of 0 bytes"):
        conn.next_event()


def test_oversized_frame_is_refused_on_its_header() -> None:
    """The four header bytes are enough to refuse a frame over the limit."""
    conn = open_server(max_frame_bytes=1000)
    conn.receive_data((1001).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError, match=r"frame of 1001 bytes.* 1 \.\. 1000 bytes"):
        conn.next_event()


def test_frame_at_the_limit_is_accepted() -> None:
    """A frame exactly max_frame_bytes long is fine."""
    conn = open_server(max_frame_bytes=1000)
    body = msgpack.packb([9, "x" * 995])  # fixarray, 9, str16 header: 5 bytes
    assert len(body) == 1000
    assert feed(conn, raw_frame(body)) == [Goodbye("x" * 995)]


@pytest.mark.parametrize("data", [b"\0\0", b"\0\0\0\x05\x91", b"\0\0\0\x02"])
def test_eof_in_the_middle_of_a_frame_is_refused(data: bytes) -> None:
    """A connection that ends inside a header or a body lost a message."""
    conn = open_server()
    conn.receive_data(data)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed in the middle of a frame"):
        conn.next_event()


def test_clean_eof_gives_connection_closed_every_time() -> None:
    """EOF between frames is a clean close, reported again on every later call."""
    conn = open_server()
    conn.receive_data(frame([7]))
    conn.receive_data(b"")
    assert conn.next_event() == Ping()
    assert conn.next_event() == ConnectionClosed()
    assert conn.next_event() == ConnectionClosed()
    assert conn.state == "closed"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xc1", id="never-used byte"),
        pytest.param(b"\x93\x03\x00", id="truncated array"),
        pytest.param(b"\x91\x07\x91\x07", id="two objects"),
        pytest.param(b"\x92\x09\xa2\xff\xfe", id="invalid utf-8"),
        pytest.param(b"\x92\x09\xdb\x7f\xff\xff\xff", id="str32 of 2 GiB"),
        pytest.param(b"\x92\x05\xc6\xff\xff\xff\xff", id="bin32 of 4 GiB"),
        pytest.param(b"\xdd\x7f\xff\xff\xff", id="array32 of 2**31"),
        pytest.param(b"\xdf\x7f\xff\xff\xff", id="map32 of 2**31"),
        pytest.param(b"\x92\x09\xc9\x7f\xff\xff\xff\x01", id="ext32 of 2 GiB"),
        pytest.param(b"\x91" * 2000 + b"\x90", id="2000 nested arrays"),
        pytest.param(b"\x82\x01\x02\x03\x04", id="map with int keys"),
        pytest.param(b"\x92\x09\xd4\x05\x00", id="extension type"),
        pytest.param(b"\x92\x09\xd6\xff\x00\x00\x00\x00", id="timestamp"),
    ],
)
def test_malformed_msgpack_is_refused(body: bytes) -> None:
    """Bytes that are not one sane msgpack value fail before anything big is allocated."""
    conn = open_server()
    conn.receive_data(raw_frame(body))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_malformed_message_names_its_type() -> None:
    """When the start of the body shows the message type, the error names it."""
    conn = open_server()
    conn.receive_data(raw_frame(b"\x93\x03\x00"))
    with pytest.raises(RemoteProtocolError, match=r"malformed BATCH \(3 bytes\)"):
        conn.next_event()


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"type": 1}, "not dict"),
        ("hello", "not str"),
        ([], "starting with nothing"),
        (["BATCH"], "starting with str"),
        ([True], "starting with bool"),
        ([42], "unknown message type 42"),
        ([0], "unknown message type 0"),
        ([-3], "unknown message type -3"),
    ],
)
def test_bodies_that_are_not_messages_are_refused(message: Any, error: str) -> None:
    """A body is an array whose first item is a known message type."""
    conn = open_server()
    conn.receive_data(frame(message))
    with pytest.raises(RemoteProtocolError, match=error):
        conn.next_event()


# Each message, valid, with the kind of each field after the type. "uint" is an int field.
KINDS_OK: dict[str, set[type]] = {
    "uint": {int},
    "str": {str},
    "bytes": {bytes},
    "bool": {bool},
    "array": {list},
    "float?": {int, float, type(None)},
    "float": {int, float},
    "str?": {str, type(None)},
}
CANDIDATES: list[Any] = [None, True, 7, 2.5, "x", b"x", [], {"a": 1}]
TEMPLATES: dict[str, tuple[list[Any], list[str], list[str]]] = {
    "HELLO": (
        hello(),
        ["uint", "str", "bytes", "bytes", "bool", "uint", "uint"],
        ["version", "cage", "journal_id", "nonce", "uses_secret", "window_calls", "window_bytes"],
    ),
    "AUTH": ([2, b"p" * 32], ["bytes"], ["proof"]),
    "BATCH": ([3, 0, [call()]], ["uint", "array"], ["settled", "calls"]),
    "BATCH call": (
        [3, 0, [call(user_id="id", deadline=2.0)]],
        ["uint", "str", "str", "bytes", "str?", "float?", "float"],
        ["key", "module", "method", "arguments", "user_id", "deadline", "created"],
    ),
    "ACK": ([4, 5, [[5, "no such method"]]], ["uint", "array"], ["high", "refused"]),
    "ACK refused": ([4, 5, [[5, "no such method"]]], ["uint", "str"], ["key", "reason"]),
    "REQUEST": (
        [5, 1, "m", "f", b"", 1.5],
        ["uint", "str", "str", "bytes", "float?"],
        ["rpc_id", "module", "method", "arguments", "timeout"],
    ),
    "RESPONSE ok": ([6, 1, True, b"r"], ["uint", "bool", "bytes"], ["rpc_id", "ok", "result"]),
    "RESPONSE error": (
        [6, 1, False, ["KeyError", "'x'", "Traceback..."]],
        ["uint", "bool", "array"],
        ["rpc_id", "ok", "result"],
    ),
    "RESPONSE error fields": (
        [6, 1, False, ["KeyError", "'x'", "Traceback..."]],
        ["str", "str", "str"],
        ["remote_type", "message", "traceback"],
    ),
    "GOODBYE": ([9, "bye"], ["str"], ["reason"]),
}


def place(template: str, message: list[Any], index: int, value: Any) -> list[Any]:
    """A copy of ``message`` with field ``index`` (of the part ``template`` names) replaced."""
    message = msgpack.unpackb(msgpack.packb(message, use_bin_type=True))  # a deep copy
    if template in ("BATCH call", "ACK refused"):
        message[2][0][index] = value
    elif template == "RESPONSE error fields":
        message[3][index] = value
    else:
        message[index + 1] = value
    return message


def receiver_for(template: str) -> Connection:
    """A connection in the state where a message of ``template`` is expected."""
    if template == "HELLO":
        conn = server()
        conn.initiate()
        return conn
    if template == "AUTH":
        conn = server(secret=SECRET)
        conn.initiate()
        conn.receive_data(frame(hello(uses_secret=True)))
        assert drain(conn) == []
        return conn
    return open_server()


def test_templates_are_valid() -> None:
    """Each template, unchanged, is accepted (so the cases below test what they claim)."""
    for template, (message, _, _) in TEMPLATES.items():
        conn = receiver_for(template)
        conn.receive_data(frame(message))
        if template == "AUTH":  # a well-formed proof, of the wrong secret
            with pytest.raises(AuthenticationError):
                conn.next_event()
        else:
            assert len(drain(conn)) == 1


WRONG_TYPES = [
    pytest.param(template, index, value, id=f"{template}-{name}-{type(value).__name__}")
    for template, (_, kinds, names) in TEMPLATES.items()
    for index, (kind, name) in enumerate(zip(kinds, names, strict=True))
    for value in CANDIDATES
    if type(value) not in KINDS_OK[kind]
]


@pytest.mark.parametrize(("template", "index", "value"), WRONG_TYPES)
def test_wrong_type_in_any_field_is_refused(template: str, index: int, value: Any) -> None:
    """Every field of every message refuses every wrong msgpack type, naming the field."""
    message = place(template, TEMPLATES[template][0], index, value)
    conn = receiver_for(template)
    conn.receive_data(frame(message))
    with pytest.raises(RemoteProtocolError) as caught:
        conn.next_event()
    assert TEMPLATES[template][2][index] in str(caught.value)


@pytest.mark.parametrize("template", [t for t in TEMPLATES if " " not in t])
def test_extra_and_missing_fields_are_refused(template: str) -> None:
    """Each message has exactly its fields."""
    message = TEMPLATES[template][0]
    for wrong in ([*message, 0], message[:-1]):
        conn = receiver_for(template)
        conn.receive_data(frame(wrong))
        with pytest.raises(RemoteProtocolError, match=f"{template}: has {len(wrong) - 1} fields"):
            conn.next_event()


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ([3, 0, [call()[:6]]], r"call 0 \(key 1\): has 6 fields"),
        ([3, 0, [[*call(), None]]], r"call 0 \(key 1\): has 8 fields"),
        ([3, 0, ["call"]], "call 0: is str"),
        ([4, 5, [[5]]], "refused entry 0: has 1 fields"),
        ([4, 5, ["no"]], "refused entry 0: is str"),
        ([6, 1, False, ["KeyError", "x"]], "result has 2 fields"),
    ],
)
def test_nested_arrays_of_the_wrong_length_are_refused(message: list[Any], error: str) -> None:
    """Calls, refusals and remote errors have exactly their fields too."""
    conn = open_server()
    conn.receive_data(frame(message))
    with pytest.raises(RemoteProtocolError, match=error):
        conn.next_event()


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ([3, -1, []], "settled is -1, outside"),
        ([3, 2**63, []], "outside 0 .. 2"),
        ([3, 0, [call(key=-5)]], "key is -5"),
        ([4, 2**64 - 1, []], "high is 18446744073709551615"),
        ([5, -1, "m", "f", b"", None], "rpc_id is -1"),
        ([5, 1, "m", "f", b"", -0.5], "timeout is -0.5"),
        ([5, 1, "m", "f", b"", math.inf], "timeout is inf"),
        ([5, 1, "m", "f", b"", math.nan], "timeout is nan"),
        ([3, 0, [call(deadline=-1.0)]], "deadline is -1.0"),
        ([3, 0, [call(created=math.nan)]], "created is nan"),
        ([9, "x" * (MAX_STR_CHARS + 1)], f"has {MAX_STR_CHARS + 1} characters"),
        ([4, 5, [[5, "x" * (MAX_STR_CHARS + 1)]]], "entry 0: reason has"),
        ([4, 5, [[-1, "no"]]], "entry 0: key is -1"),
        ([4, 5, [[6, "no"]]], "refused key 6 is above high 5"),
        ([4, 5, [[1, "no"]] * (MAX_REFUSED + 1)], f"at most {MAX_REFUSED}"),
        ([6, 1, False, ["E", "m", "t" * (MAX_STR_CHARS + 1)]], "traceback has"),
    ],
)
def test_values_out_of_range_are_refused(message: list[Any], error: str) -> None:
    """Ints fit 63 bits, times are finite and >= 0, texts and lists have a length limit."""
    conn = open_server()
    conn.receive_data(frame(message))
    with pytest.raises(RemoteProtocolError, match=error):
        conn.next_event()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("module", "_private"),
        ("module", "class"),
        ("module", "a-b"),
        ("module", "x" * 129),
        ("module", "caf\u00e9"),
        ("method", "__init__"),
        ("method", ""),
        ("user_id", ""),
        ("user_id", "a\nb"),
        ("user_id", "x" * 201),
    ],
)
def test_call_names_breaking_the_rules_are_refused(field: str, value: str) -> None:
    """Module and method names follow check_identifier, user ids check_call_id."""
    conn = open_server()
    conn.receive_data(frame([3, 0, [call(7, **{field: value})]]))
    with pytest.raises(RemoteProtocolError, match=f"BATCH call 0 \\(key 7\\): {field} is not"):
        conn.next_event()


@pytest.mark.parametrize("name", ["loopback", "x_queue", "", "a b", "x" * 33])
def test_cage_names_breaking_the_rules_are_refused(name: str) -> None:
    """The peer's cage name follows check_cage_name."""
    conn = receiver_for("HELLO")
    conn.receive_data(frame(hello(cage=name)))
    with pytest.raises(RemoteProtocolError, match="HELLO: cage is not allowed"):
        conn.next_event()


@pytest.mark.parametrize(
    ("field", "value"), [("journal_id", b"x" * 15), ("nonce", b"x" * 33), ("window_calls", 0)]
)
def test_hello_values_out_of_range_are_refused(field: str, value: Any) -> None:
    """Journal ids and nonces have their exact size; windows are at least 1."""
    conn = receiver_for("HELLO")
    conn.receive_data(frame(hello(**{field: value})))
    with pytest.raises(RemoteProtocolError, match=f"HELLO: {field}"):
        conn.next_event()


@settings(max_examples=rounds(200, 3000))
@given(data=st.binary(max_size=200), secret=st.booleans(), established=st.booleans())
def test_random_bytes_raise_only_protocol_errors(
    data: bytes, secret: bool, established: bool
) -> None:
    """Whatever bytes come, the result is valid events or RemoteProtocolError, nothing else."""
    options = {"secret": SECRET} if secret else {}
    conn = open_pair(options, **options).server if established else receiver_for("HELLO")
    try:
        feed(conn, data)
        conn.receive_data(b"")
        drain(conn)
    except (RemoteProtocolError, AuthenticationError):
        assert conn.state == "closed"


@given(
    events=st.lists(messages, min_size=1, max_size=4),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=3),
    cut=st.none() | st.integers(0, 10**6),
)
def test_mutated_frames_raise_only_protocol_errors(
    events: list[SendEvent], flips: list[tuple[int, int]], cut: int | None
) -> None:
    """Valid frames with flipped bits or cut short give valid events or RemoteProtocolError."""
    data = bytearray(b"".join(frame_of(event) for event in events))
    for position, bit in flips:
        data[position % len(data)] ^= 1 << bit
    if cut is not None:
        del data[cut % len(data) :]
    conn = open_server()
    try:
        feed(conn, bytes(data), [1, 5, 9])
        conn.receive_data(b"")
        drain(conn)
    except RemoteProtocolError:
        assert conn.state == "closed"


def frame_of(event: SendEvent) -> bytes:
    """The bytes a client sends for ``event`` (a Response is sent as its wire form)."""
    if isinstance(event, Response):
        result = event.result if event.ok else list(event.error or ())
        return frame([6, event.rpc_id, event.ok, result])
    return open_pair().client.send(event)


# Errors are final


def test_connection_stays_failed_after_a_remote_error() -> None:
    """After RemoteProtocolError every next_event raises it again and only GOODBYE is sent."""
    conn = open_server()
    conn.receive_data(frame([42]) + frame([7]))
    with pytest.raises(RemoteProtocolError, match="unknown message type 42"):
        conn.next_event()
    assert conn.state == "closed"
    with pytest.raises(RemoteProtocolError, match="already failed: unknown message type 42"):
        conn.next_event()
    conn.receive_data(frame([7]))  # ignored
    with pytest.raises(LocalProtocolError, match="connection failed"):
        conn.send(Ping())
    assert conn.send(Goodbye("unknown message type 42")) == frame([9, "unknown message type 42"])
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_connection_stays_failed_after_an_authentication_error() -> None:
    """After AuthenticationError every next_event raises AuthenticationError again."""
    pair = Pair(expect_peer="gamma")
    pair.server.initiate()
    pair.server.receive_data(pair.client.initiate())
    for _ in range(2):
        with pytest.raises(AuthenticationError, match="expected cage 'gamma'"):
            pair.server.next_event()


# Flow control


def batch_frame(keys: list[int], size: int = 3, settled: int = 0) -> bytes:
    """A forged BATCH frame of calls with these keys and ``size``-byte arguments."""
    return frame([3, settled, [call(key, arguments=b"a" * size) for key in keys]])


def test_peer_over_the_calls_window_is_refused() -> None:
    """The receiver refuses a peer that sends more unacknowledged calls than its window."""
    conn = open_server(window_calls=3)
    conn.receive_data(batch_frame([1, 2]) + batch_frame([3, 4]))
    assert len(drain_until_error(conn, "peer sent 4 unacknowledged calls, window is 3")) == 1


def test_peer_over_the_bytes_window_is_refused() -> None:
    """The receiver refuses a peer that sends more unacknowledged argument bytes than allowed."""
    conn = open_server(window_bytes=10)
    conn.receive_data(batch_frame([1, 2], size=5) + batch_frame([3], size=1))
    drain_until_error(conn, "peer sent 11 unacknowledged bytes of arguments, window is 10")


def drain_until_error(conn: Connection, error: str) -> list[Event]:
    """The events before the RemoteProtocolError matching ``error`` that must come."""
    events: list[Event] = []
    with pytest.raises(RemoteProtocolError, match=error):
        while True:
            event = conn.next_event()
            assert event is not NEED_DATA
            events.append(event)
    return events


def test_our_ack_reopens_the_window() -> None:
    """Calls up to ACK.high no longer count, including part of a batch."""
    conn = open_server(window_calls=3, window_bytes=9)
    conn.receive_data(batch_frame([1, 2, 3]))
    assert len(drain(conn)) == 1
    conn.send(Ack(1, []))
    conn.receive_data(batch_frame([4]))
    assert len(drain(conn)) == 1
    conn.send(Ack(4, []))
    conn.receive_data(batch_frame([5, 6, 7]))
    assert len(drain(conn)) == 1
    conn.receive_data(batch_frame([8]))
    drain_until_error(conn, "peer sent 4 unacknowledged calls")


def test_sender_room_and_in_flight_follow_batches_and_acks() -> None:
    """in_flight() counts what we sent above the last ACK; room() is what the peer allows."""
    pair = open_pair(window_calls=4, window_bytes=100)
    calls = [WireCall(key, "m", "f", b"x" * 10, None, None, 1.0) for key in range(1, 4)]
    pair.send(pair.client, Batch(0, calls))
    assert pair.client.in_flight() == (3, 30) and pair.client.room() == (1, 70)
    pair.send(pair.server, Ack(2, []))
    assert pair.client.in_flight() == (1, 10) and pair.client.room() == (3, 90)
    pair.send(pair.server, Ack(3, [(3, "refused")]))
    assert pair.client.in_flight() == (0, 0) and pair.client.room() == (4, 100)


@pytest.mark.parametrize(
    ("count", "size", "error"),
    [(5, 1, "make 5 unacknowledged calls, window is 4"), (2, 51, "102 .* bytes.*window is 100")],
)
def test_send_over_the_peer_window_raises_and_changes_nothing(
    count: int, size: int, error: str
) -> None:
    """A BATCH the peer's window cannot take is refused before anything is sent."""
    pair = open_pair(window_calls=4, window_bytes=100)
    calls = [WireCall(key, "m", "f", b"x" * size, None, None, 1.0) for key in range(1, count + 1)]
    with pytest.raises(LocalProtocolError, match=error):
        pair.client.send(Batch(0, calls))
    assert pair.client.in_flight() == (0, 0)
    assert pair.send(pair.client, Batch(0, calls[:1])) == [Batch(0, calls[:1])]


def test_keys_must_increase_along_the_connection() -> None:
    """Keys go strictly up within a batch and from one batch to the next."""
    for data, error in [
        (batch_frame([1, 1]), r"call 1 \(key 1\): key is not above the previous key 1"),
        (batch_frame([2, 1]), r"call 1 \(key 1\): key is not above the previous key 2"),
        (
            batch_frame([5]) + batch_frame([5]),
            "call 0 .key 5.: key is not above the previous key 5",
        ),
    ]:
        conn = open_server()
        conn.receive_data(data)
        drain_until_error(conn, error)


def test_send_with_keys_not_increasing_raises_local_error() -> None:
    """send() refuses keys at or below the last key sent, and changes nothing."""
    pair = open_pair()
    pair.client.send(Batch(0, [WireCall(5, "m", "f", b"", None, None, 1.0)]))
    for keys in ([5], [6, 6], [7, 3]):
        calls = [WireCall(key, "m", "f", b"", None, None, 1.0) for key in keys]
        with pytest.raises(LocalProtocolError, match="not above the previous key"):
            pair.client.send(Batch(0, calls))
    assert pair.client.in_flight() == (1, 0)


def test_settled_must_not_go_down() -> None:
    """The sender's settled mark only moves up, both ways."""
    conn = open_server()
    conn.receive_data(batch_frame([1], settled=5) + batch_frame([2], settled=5))
    conn.receive_data(batch_frame([3], settled=4))
    drain_until_error(conn, "settled went down from 5 to 4")
    pair = open_pair()
    pair.client.send(Batch(5, []))
    with pytest.raises(LocalProtocolError, match="settled went down from 5 to 4"):
        pair.client.send(Batch(4, []))


def test_ack_high_must_not_go_down() -> None:
    """ACK.high only moves up (or stays), both ways."""
    pair = open_pair()
    pair.client.receive_data(frame([4, 9, []]) + frame([4, 9, []]) + frame([4, 8, []]))
    drain_until_error(pair.client, "ACK: high went down from 9 to 8")
    pair.server.send(Ack(9, []))
    with pytest.raises(LocalProtocolError, match="high went down from 9 to 8"):
        pair.server.send(Ack(8, []))


def test_first_ack_may_exceed_every_key_sent() -> None:
    """The receiver's durable high-water mark comes right after the handshake."""
    pair = open_pair(window_calls=2)
    assert pair.send(pair.server, Ack(100, [])) == [Ack(100, [])]
    calls = [WireCall(key, "m", "f", b"x", None, None, 1.0) for key in (99, 100, 101, 102)]
    assert pair.send(pair.client, Batch(0, calls)) == [Batch(0, calls)]
    assert pair.client.in_flight() == (2, 2)


def test_crossing_ack_does_not_trip_the_window() -> None:
    """An ACK and a resent BATCH that cross on the wire leave both ends agreeing."""
    pair = open_pair(window_calls=4)
    durable_mark = pair.server.send(Ack(100, []))  # in transit to the client
    first = [WireCall(key, "m", "f", b"", None, None, 1.0) for key in (99, 100, 101, 102)]
    resent = pair.client.send(Batch(0, first))  # in transit to the server
    assert feed(pair.client, durable_mark) == [Ack(100, [])]
    assert pair.client.room() == (2, DEFAULT_WINDOW_BYTES)
    more = [WireCall(key, "m", "f", b"", None, None, 1.0) for key in (103, 104)]
    data = resent + pair.client.send(Batch(0, more))
    assert [len(e.calls) for e in feed(pair.server, data) if isinstance(e, Batch)] == [4, 2]


@given(st.lists(st.sampled_from(["send", "ack", "to_server", "to_client"]), max_size=60))
def test_a_sender_that_respects_room_never_trips_the_window(actions: list[str]) -> None:
    """Whatever the interleaving of batches, ACKs and deliveries, the window check holds."""
    pair = open_pair(window_calls=5, window_bytes=50)
    wire: dict[Connection, bytes] = {pair.client: b"", pair.server: b""}
    key, received_high = 0, 0
    for action in actions:
        if action == "send":
            room_calls, room_bytes = pair.client.room()
            count = min(room_calls, room_bytes // 7, 3)
            calls = [
                WireCall(key + i + 1, "m", "f", b"x" * 7, None, None, 0.0) for i in range(count)
            ]
            key += count
            wire[pair.server] += pair.client.send(Batch(0, calls))
        elif action == "ack":
            wire[pair.client] += pair.server.send(Ack(received_high, []))
        else:
            conn = pair.server if action == "to_server" else pair.client
            for event in feed(conn, wire[conn]):
                if isinstance(event, Batch) and event.calls:
                    received_high = event.calls[-1][0]
            wire[conn] = b""
    feed(pair.server, wire[pair.server])
    feed(pair.client, wire[pair.client] + pair.server.send(Ack(key, [])))
    assert pair.client.in_flight() == (0, 0) and pair.client.room() == (5, 50)


def test_names_are_still_checked_once_the_name_cache_is_full() -> None:
    """A peer that sends thousands of distinct names cannot slip a bad one past the cache."""
    conn = open_server()
    many = [call(key, module=f"m{key}") for key in range(1, 5001)]
    conn.receive_data(frame([3, 0, many]) + frame([3, 0, [call(6000, module="_private")]]))
    assert len(drain_until_error(conn, r"call 0 \(key 6000\): module is not allowed")) == 1


# Requests and responses


def request_frame(rpc_id: int) -> bytes:
    """A forged REQUEST frame."""
    return frame([5, rpc_id, "m", "f", b"", None])


def test_too_many_concurrent_requests_are_refused() -> None:
    """A peer may have MAX_CONCURRENT_REQUESTS REQUESTs waiting, not one more."""
    conn = open_server()
    conn.receive_data(b"".join(request_frame(i) for i in range(MAX_CONCURRENT_REQUESTS + 1)))
    events = drain_until_error(conn, f"{MAX_CONCURRENT_REQUESTS} REQUESTs already wait")
    assert len(events) == MAX_CONCURRENT_REQUESTS


def test_a_repeated_rpc_id_is_refused_until_answered() -> None:
    """An rpc_id may be reused once its RESPONSE went out, not before."""
    conn = open_server()
    conn.receive_data(request_frame(1))
    drain(conn)
    conn.send(Response(1, True, b"", None))
    conn.receive_data(request_frame(1) + request_frame(1))
    drain_until_error(conn, "rpc_id 1 is already waiting")


def test_response_with_an_unknown_rpc_id_is_delivered() -> None:
    """The receiver of a RESPONSE does not track ids: the transport ignores stale ones."""
    conn = open_server()
    conn.receive_data(frame([6, 77, True, b"late"]))
    assert drain(conn) == [Response(77, True, b"late", None)]


def test_send_response_needs_a_waiting_request() -> None:
    """We answer only REQUESTs we got, once each."""
    pair = open_pair()
    with pytest.raises(LocalProtocolError, match="no REQUEST with rpc_id 3"):
        pair.server.send(Response(3, True, b"", None))
    pair.send(pair.client, Request(3, "m", "f", b"", None))
    pair.server.send(Response(3, False, None, ("E", "m", "t")))
    with pytest.raises(LocalProtocolError, match="no REQUEST with rpc_id 3"):
        pair.server.send(Response(3, True, b"", None))


@pytest.mark.parametrize(
    "response",
    [Response(3, True, b"", ("E", "m", "t")), Response(3, False, b"", ("E", "m", "t"))],
)
def test_send_response_with_both_result_and_error_raises(response: Response) -> None:
    """ok=True carries a result only, ok=False an error only."""
    pair = open_pair()
    pair.send(pair.client, Request(3, "m", "f", b"", None))
    with pytest.raises(LocalProtocolError, match="ok=True takes a result"):
        pair.server.send(response)


def test_send_request_limits_match_the_receiver() -> None:
    """send() refuses a repeated rpc_id or one REQUEST over the limit; a RESPONSE frees one."""
    pair = open_pair()
    for rpc_id in range(MAX_CONCURRENT_REQUESTS):
        pair.client.send(Request(rpc_id, "m", "f", b"", None))
    with pytest.raises(LocalProtocolError, match="already waiting"):
        pair.client.send(Request(0, "m", "f", b"", None))
    with pytest.raises(
        LocalProtocolError, match=f"{MAX_CONCURRENT_REQUESTS} REQUESTs already wait"
    ):
        pair.client.send(Request(10**6, "m", "f", b"", None))
    pair.client.receive_data(frame([6, 0, True, b""]))
    drain(pair.client)
    pair.client.send(Request(0, "m", "f", b"", None))


# Ping, goodbye, EOF


def test_ping_is_answered_with_pong() -> None:
    """PING comes out as Ping() and leaves a PONG in data_to_send()."""
    pair = open_pair()
    conn = pair.server
    conn.receive_data(pair.client.send(Ping()))
    assert drain(conn) == [Ping()]
    pong = conn.data_to_send()
    assert pong == frame([8]) and conn.data_to_send() == b""
    assert feed(pair.client, pong) == [Pong()]


def test_goodbye_carries_its_reason_and_nothing_may_follow() -> None:
    """After a GOODBYE either way the connection is closed; EOF is still clean."""
    pair = open_pair()
    data = pair.client.send(Goodbye("shutting down"))
    assert pair.client.state == "closed"
    with pytest.raises(LocalProtocolError, match="GOODBYE was already sent"):
        pair.client.send(Goodbye("again"))
    assert feed(pair.server, data) == [Goodbye("shutting down")]
    assert pair.server.state == "closed"
    conn = open_server()
    conn.receive_data(frame([9, "bye"]) + frame([9, "bye"]))
    drain_until_error(conn, "GOODBYE after GOODBYE")
    conn = open_server()
    assert feed(conn, frame([9, "bye"]) + b"") == [Goodbye("bye")]
    conn.receive_data(b"")
    assert drain(conn) == [ConnectionClosed()]


# Misuse of the API


@pytest.mark.parametrize(
    "event",
    [
        Batch(0, []),
        Ack(0, []),
        Request(1, "m", "f", b"", None),
        Response(1, True, b"", None),
        Ping(),
    ],
)
def test_send_before_established_raises_local_error(event: SendEvent) -> None:
    """Application messages wait for the handshake (GOODBYE excepted)."""
    conn = client()
    with pytest.raises(LocalProtocolError, match="before Established"):
        conn.send(event)
    conn.initiate()
    with pytest.raises(LocalProtocolError, match="before Established"):
        conn.send(event)


def test_after_a_clean_close_only_answers_and_goodbye_can_be_sent() -> None:
    """A peer that closed its side still reads: ACK and RESPONSE may follow (what became of
    what it sent), PING, BATCH and REQUEST may not; after an error or a GOODBYE, nothing."""
    conn = open_server()
    assert conn.may_answer
    conn.receive_data(frame([3, 0, [[1, "m", "f", b"", None, None, 1.0]]]))
    conn.receive_data(b"")  # EOF
    assert [type(event) for event in drain(conn)] == [Batch, ConnectionClosed]
    assert conn.state == "closed" and conn.may_answer
    assert conn.send(Ack(1, [])) == frame([4, 1, []])
    for event in (Ping(), Batch(0, []), Request(1, "m", "f", b"", None)):
        with pytest.raises(LocalProtocolError, match="connection is closed"):
            conn.send(event)
    conn.send(Goodbye("done"))
    assert not conn.may_answer
    with pytest.raises(LocalProtocolError, match="GOODBYE was already sent"):
        conn.send(Ack(1, []))
    failed = open_server()
    failed.receive_data(raw_frame(b"\xc1"))
    drain_until_error(failed, "malformed message")
    assert not failed.may_answer


@pytest.mark.parametrize(
    "event", [Established("a", CLIENT_ID, 1, 1), Pong(), ConnectionClosed(), object(), b"\x91\x07"]
)
def test_send_takes_only_application_messages(event: Any) -> None:
    """Anything else is a plain TypeError."""
    with pytest.raises(TypeError, match="send\\(\\) takes"):
        open_pair().client.send(event)


@pytest.mark.parametrize(
    ("event", "error"),
    [
        (Batch(-1, []), "settled is -1"),
        (Batch(0, "calls"), "calls is str"),  # type: ignore[arg-type]
        (Batch(0, [WireCall(True, "m", "f", b"", None, None, 1.0)]), "key is bool"),
        (Batch(0, [WireCall(1, "_m", "f", b"", None, None, 1.0)]), "module is not allowed"),
        (Batch(0, [WireCall(1, "m", "f", bytearray(), None, None, 1.0)]), "arguments is bytearray"),  # type: ignore[arg-type]
        (Batch(0, [WireCall(1, "m", "f", b"", None, math.nan, 1.0)]), "deadline is nan"),
        (Batch(0, [(1, "m", "f", b"", None, None)]), r"call 0 \(key 1\): has 6 fields"),  # type: ignore[list-item]
        (Ack(1, [(2, "x")]), "refused key 2 is above high 1"),
        (Ack(1, [(1, 1)]), "entry 0: reason is int"),  # type: ignore[list-item]
        (Request(1, "m", "class", b"", None), "method is not allowed"),
        (Request(1, "m", "f", b"", math.inf), "timeout is inf"),
        (Goodbye("x" * (MAX_STR_CHARS + 1)), "reason has"),
        (Goodbye(None), "reason is nil"),  # type: ignore[arg-type]
    ],
)
def test_send_refuses_malformed_events_and_changes_nothing(event: SendEvent, error: str) -> None:
    """send() checks what the peer would check; a refused event leaves the connection open."""
    pair = open_pair()
    with pytest.raises(LocalProtocolError, match=error):
        pair.client.send(event)
    assert pair.client.state == "open"
    assert pair.send(pair.client, Ping()) == [Ping()]


def test_send_refuses_frames_over_the_limit() -> None:
    """A message whose frame would be over max_frame_bytes is refused before it is sent."""
    pair = open_pair({"max_frame_bytes": 1000})
    with pytest.raises(LocalProtocolError, match=r"REQUEST takes 1\d\d\d bytes, over the frame"):
        pair.client.send(Request(1, "m", "f", b"x" * 1000, None))
    pair.client.send(Request(1, "m", "f", b"x" * 900, None))


def test_receive_data_checks_its_argument_and_eof() -> None:
    """Only bytes-like data, and nothing after EOF (but EOF again is harmless)."""
    conn = open_server()
    with pytest.raises(TypeError, match="must be bytes"):
        conn.receive_data("text")  # type: ignore[arg-type]
    conn.receive_data(bytearray(frame([7])[:3]))
    conn.receive_data(memoryview(frame([7])[3:]))
    assert drain(conn) == [Ping()]
    conn.receive_data(b"")
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after EOF"):
        conn.receive_data(b"x")


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        (("peer", "a", CLIENT_ID), {}, ValueError),
        (("client", "loopback", CLIENT_ID), {}, ValueError),
        (("client", "a", b"short"), {}, ValueError),
        (("client", "a", CLIENT_ID), {"nonce": b"short"}, ValueError),
        (("client", "a", CLIENT_ID), {"secret": b""}, ValueError),
        (("client", "a", CLIENT_ID), {"secret": "text"}, ValueError),
        (("client", "a", CLIENT_ID), {"expect_peer": "x_queue"}, ValueError),
        (("client", "a", CLIENT_ID), {"window_calls": 0}, ValueError),
        (("client", "a", CLIENT_ID), {"window_bytes": 1.5}, TypeError),
        (("client", "a", CLIENT_ID), {"max_frame_bytes": 2**32}, ValueError),
        (("client", "a", CLIENT_ID), {"max_frame_bytes": 100}, ValueError),
    ],
)
def test_constructor_refuses_bad_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception]
) -> None:
    """Misused arguments raise plain TypeError or ValueError."""
    with pytest.raises(error):
        Connection(*args, **kwargs)


def test_defaults_are_advertised_in_hello() -> None:
    """Without options a cage offers the default window."""
    pair = Pair()
    seen = pair.handshake()
    assert seen[pair.client] == [
        Established("beta", SERVER_ID, DEFAULT_WINDOW_CALLS, DEFAULT_WINDOW_BYTES)
    ]
