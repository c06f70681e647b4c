"""The pmq wire protocol, sans I/O: frames, messages and the rules of one connection.

Owns: the bytes between two cages (DESIGN.md §5) and the state of one connection: the handshake
(versions, names, HMAC proof of a shared secret), which message may come when, the flow-control
window and every size limit. The layout of a frame, the message types and the checks of one
message's fields live in ``pmq._wire``, whose docstring gives the wire format; this module owns
the rest and the public events. Must not: touch sockets, asyncio, clocks or the disk, log, decode
call arguments (they stay opaque bytes for ``pmq._codec``), or know what a store or a queue is.
The caller moves the bytes, as with h11: ``receive_data()``, then ``next_event()`` until
``NEED_DATA``; ``send(event)`` gives the bytes of an application message; ``data_to_send()``
gives what the protocol itself must write (AUTH, PONG).

Theory of operation:
- Both sides send HELLO as soon as the socket is up. Without a secret, the peer's HELLO completes
  the handshake. With one, each side answers the peer's HELLO with AUTH, proof =
  HMAC-SHA256(secret, "pmq-auth-1\\0" + role byte + own name + "\\0" + peer name + "\\0" +
  peer nonce + own nonce): the role byte, the order of the names and the fresh nonces make a
  proof worthless on any other connection or in the other direction (no reflection, no replay).
- GOODBYE may be sent, and received, once in any state (even mid-handshake or after an error),
  so a side that closes on purpose can tell the peer why. Nothing may follow it.
- A clean EOF from the peer (between frames, after the handshake) ends what it sends, not what
  it may read: ACKs and RESPONSEs may still be sent (``may_answer``), nothing else.
- Flow control: each side counts the calls and argument bytes of BATCHes on this connection whose
  keys are above the last ACK.high sent (receiver) or received (sender). The receiver refuses a
  peer that goes over its advertised window; the sender refuses to send over the peer's window.
  Since the sender drops a call from its count only on an ACK the receiver already sent, the
  sender's count is never below the receiver's, and a well-behaved sender never trips the check,
  even when the receiver's first ACK (its durable high-water mark) crosses a resent BATCH.

Invariants:
- Whatever the peer sends, ``next_event`` raises only ``RemoteProtocolError`` or
  ``AuthenticationError`` (``LocalProtocolError`` only for misuse by the caller). After it has
  raised, the connection is closed and every later ``next_event`` raises the same kind again.
- ``send`` returns the bytes of the whole message and updates the state, or raises
  ``LocalProtocolError`` and changes nothing. Outgoing messages pass the very checks incoming
  ones do, so what ``send`` accepts the peer's ``next_event`` accepts (given the same
  ``max_frame_bytes`` on both ends: the limit is not told in HELLO).
- A frame's length is judged on its 4 header bytes, before its body is waited for (and until
  the handshake completes, against ``HANDSHAKE_MAX_FRAME_BYTES``); every length
  msgpack honours inside a body (``pmq._wire.decode``) is bounded by the body's size and its
  nesting by msgpack's fixed stack, so no input makes this module allocate or recurse without
  bound.

Speed: a BATCH is checked call by call in one boolean expression of type checks
(``pmq._wire.check_calls``), with module and method names looked up in a per-connection set of
names already checked. Measured on a slow 2-core machine, a BATCH of 1,000 calls with 100-byte
arguments: send() takes about 0.55 ms (0.55 us a call, a third of it msgpack), receive_data() +
next_event() about 0.75 ms (0.75 us a call, a third of it msgpack).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from typing import Any, Final, Literal, NamedTuple, TypeAlias

from pmq._names import check_cage_name
from pmq._wire import (
    ACK,
    AUTH,
    BATCH,
    GOODBYE,
    HEADER,
    HELLO,
    ID_BYTES,
    NAMES,
    NONCE_BYTES,
    PING,
    PONG,
    PONG_FRAME,
    REQUEST,
    RESPONSE,
    UINT_LIMIT,
    Invalid,
    check_calls,
    decode,
    encoder,
    message_checker,
)
from pmq.errors import AuthenticationError, LocalProtocolError, PmqError, RemoteProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_WINDOW_BYTES",
    "DEFAULT_WINDOW_CALLS",
    "MAX_CONCURRENT_REQUESTS",
    "MAX_REFUSED",
    "MAX_STR_CHARS",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "Ack",
    "Batch",
    "Connection",
    "ConnectionClosed",
    "Established",
    "Event",
    "Goodbye",
    "NeedData",
    "Ping",
    "Pong",
    "Request",
    "Response",
    "SendEvent",
    "WireCall",
]

PROTOCOL_VERSION = 1
_MIB = 1024 * 1024
DEFAULT_MAX_FRAME_BYTES = 16 * _MIB
#: Until the handshake completes, a frame may be no bigger: a HELLO takes about 110 bytes and a
#: GOODBYE's reason a few hundred, and a stranger must not make us wait for (and buffer) 16 MiB.
HANDSHAKE_MAX_FRAME_BYTES = 8 * 1024
#: How many calls, and how many bytes of their arguments, a peer may send before our ACK.
DEFAULT_WINDOW_CALLS = 8192
DEFAULT_WINDOW_BYTES = 16 * _MIB
#: Longest refusal reason, GOODBYE reason, and remote error type, message or traceback.
MAX_STR_CHARS = 64 * 1024
#: Most refusals one ACK may carry.
MAX_REFUSED = 65536
#: Most REQUESTs one side may have outstanding (sent, no RESPONSE yet) on a connection.
MAX_CONCURRENT_REQUESTS = 1024

_AUTH_CONTEXT = b"pmq-auth-1\0"
#: Checks the fields of a message (not the calls of a BATCH) under the limits above.
_check_message: Final = message_checker(MAX_STR_CHARS, MAX_REFUSED)


class NeedData(enum.Enum):
    """The type of ``NEED_DATA``: ``next_event`` needs more bytes before it can say more."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


class WireCall(NamedTuple):
    """One call in a BATCH; ``arguments`` are the opaque bytes made by ``pmq._codec``.

    A sender may give WireCalls or plain tuples in this order. A receiver gets plain tuples
    (``WireCall._make(call)`` names them): the garbage collector stops tracking a plain tuple of
    plain values but never a NamedTuple, and thousands of calls per BATCH made the receiving
    cage spend a sixth of its time in collections.
    """

    key: int
    module: str
    method: str
    arguments: bytes
    user_id: str | None
    deadline: float | None
    created: float


@dataclass(frozen=True, slots=True)
class Established:
    """The handshake is complete: the peer is who it says (and knows the secret, if any)."""

    peer: str
    journal_id: bytes
    window_calls: int
    window_bytes: int


@dataclass(frozen=True, slots=True)
class Batch:
    """Calls for the receiver to store; ``settled`` is the sender's own progress mark."""

    settled: int
    calls: list[tuple[Any, ...]]  # WireCall's fields, in its order (received: plain tuples)


@dataclass(frozen=True, slots=True)
class Ack:
    """Every call with key <= ``high`` is durable on the receiver or listed as refused."""

    high: int
    refused: list[tuple[int, str]]


@dataclass(frozen=True, slots=True)
class Request:
    """A synchronous call; ``timeout`` is in seconds, None for none."""

    rpc_id: int
    module: str
    method: str
    arguments: bytes
    timeout: float | None


@dataclass(frozen=True, slots=True)
class Response:
    """The outcome of a REQUEST: ``result`` if ``ok``, else ``error`` (type, message, traceback)."""

    rpc_id: int
    ok: bool
    result: bytes | None
    error: tuple[str, str, str] | None


@dataclass(frozen=True, slots=True)
class Ping:
    """Are you there? Answered with a PONG by the protocol itself."""


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to our PING."""


@dataclass(frozen=True, slots=True)
class Goodbye:
    """The peer is closing the connection on purpose, for ``reason``."""

    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the connection cleanly, between two frames."""


Event: TypeAlias = (
    Established | Batch | Ack | Request | Response | Ping | Pong | Goodbye | ConnectionClosed
)
SendEvent: TypeAlias = Batch | Ack | Request | Response | Ping | Goodbye
_ANSWERS = (Ack, Response)  # what may still be sent to a peer that closed its side
_call_key = itemgetter(0)


class _Flow:
    """One direction of a connection: its BATCHes and its REQUESTs.

    ``calls`` and ``bytes`` count the calls of BATCHes whose keys are above ``high``, the last
    ACK.high the other way (see "Flow control" in the module docstring); ``key`` and ``settled``
    are the last BATCH key and settled mark; ``requests`` are the REQUESTs without a RESPONSE.
    """

    __slots__ = ("_batches", "bytes", "calls", "high", "key", "requests", "settled")

    def __init__(self) -> None:
        self._batches: deque[list[Any]] = deque()  # [calls, first index still counted, bytes]
        self.calls = self.bytes = 0
        self.key = self.settled = self.high = -1
        self.requests: set[int] = set()

    def admit(
        self, settled: int, calls: Sequence[Any], nbytes: int, window: tuple[int, int], who: str
    ) -> tuple[Sequence[Any], int]:
        """Check a BATCH of checked ``calls``; the part of them that counts, and its bytes."""
        if settled < self.settled:
            raise Invalid(f"BATCH: settled went down from {self.settled} to {settled}")
        if calls and calls[0][0] <= self.high:  # already covered by an ACK: they do not count
            cut = bisect_right(calls, self.high, key=_call_key)
            nbytes -= sum(len(call[3]) for call in calls[:cut])
            calls = calls[cut:]
        for total, limit, unit in (
            (self.calls + len(calls), window[0], "calls"),
            (self.bytes + nbytes, window[1], "bytes of arguments"),
        ):
            if total > limit:
                raise Invalid(f"{who} {total} unacknowledged {unit}, window is {limit}")
        return calls, nbytes

    def add(self, settled: int, key: int, counted: Sequence[Any], nbytes: int) -> None:
        """Record a BATCH that ``admit`` accepted."""
        self.settled, self.key = settled, key
        if counted:
            self._batches.append([tuple(counted), 0, nbytes])
            self.calls += len(counted)
            self.bytes += nbytes

    def check_ack(self, high: int, refused: Sequence[Any]) -> None:
        if high < self.high:
            raise Invalid(f"ACK: high went down from {self.high} to {high}")
        for key, _ in refused:
            if key > high:
                raise Invalid(f"ACK: refused key {key} is above high {high}")

    def release(self, high: int) -> None:
        """An ACK: forget every call with key <= ``high``."""
        self.high = high
        batches = self._batches
        while batches:
            entry = batches[0]
            calls, first, nbytes = entry
            if calls[-1][0] <= high:
                batches.popleft()
                self.calls -= len(calls) - first
                self.bytes -= nbytes
                continue
            while calls[first][0] <= high:
                size = len(calls[first][3])
                nbytes -= size
                self.bytes -= size
                self.calls -= 1
                first += 1
            entry[1], entry[2] = first, nbytes
            return

    def check_request(self, rpc_id: int) -> None:
        if rpc_id in self.requests:
            raise Invalid(f"REQUEST: rpc_id {rpc_id} is already waiting for its RESPONSE")
        if len(self.requests) >= MAX_CONCURRENT_REQUESTS:
            raise Invalid(
                f"REQUEST: {MAX_CONCURRENT_REQUESTS} REQUESTs already wait for their RESPONSE, "
                "the most allowed"
            )


class Connection:
    """One connection between two cages, as a state machine that does no I/O.

    Not thread-safe: one task owns a Connection and makes every call on it.

    Args:
        role: ``"client"`` on the side that connected, ``"server"`` on the side that accepted.
        cage: this cage's name.
        journal_id: this cage's journal identity (16 bytes), told to the peer.
        secret: the shared secret, or None; both sides must have one, or neither.
        expect_peer: the cage the peer must say it is, or None to accept any name.
        window_calls: how many unacknowledged calls the peer may send us.
        window_bytes: how many bytes of unacknowledged call arguments the peer may send us.
        max_frame_bytes: the largest frame body, either way.
        nonce: this side's handshake nonce (32 bytes); leave it None except in tests.

    Raises:
        TypeError, ValueError: an argument has the wrong type or value.

    Attributes:
        peer, peer_journal_id, peer_window_calls, peer_window_bytes: what the peer said in its
            HELLO, once Established (empty or 0 before).
    """

    def __init__(
        self,
        role: Literal["client", "server"],
        cage: str,
        journal_id: bytes,
        *,
        secret: bytes | None = None,
        expect_peer: str | None = None,
        window_calls: int = DEFAULT_WINDOW_CALLS,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        nonce: bytes | None = None,
    ) -> None:
        if role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        for name, blob, size in (("journal_id", journal_id, ID_BYTES), ("nonce", nonce, 32)):
            if blob is not None and (type(blob) is not bytes or len(blob) != size):
                raise ValueError(f"{name} must be {size} bytes, not {blob!r:.60}")
        if secret is not None and (type(secret) is not bytes or not secret):
            raise ValueError("secret must be non-empty bytes or None")
        for name, value, low, limit in (
            ("window_calls", window_calls, 1, UINT_LIMIT),
            ("window_bytes", window_bytes, 1, UINT_LIMIT),
            ("max_frame_bytes", max_frame_bytes, 256, 2**32),  # a HELLO takes about 110
        ):
            if type(value) is not int:
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            if not low <= value < limit:
                raise ValueError(f"{name} must be {low} .. {limit - 1}, not {value}")
        self.role: Final = role
        self.cage: Final = check_cage_name(cage)
        self.journal_id: Final = journal_id
        self.window_calls: Final = window_calls
        self.window_bytes: Final = window_bytes
        self.max_frame_bytes: Final = max_frame_bytes
        self.peer, self.peer_journal_id = "", b""
        self.peer_window_calls = self.peer_window_bytes = 0
        self._secret = secret
        self._expect_peer = None if expect_peer is None else check_cage_name(expect_peer)
        self._nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
        self._frame = encoder(max_frame_bytes)  # message -> frame, or raises Invalid
        self._buffer = bytearray()
        self._start = 0  # where the next frame begins in _buffer
        self._outgoing = bytearray()  # AUTH and PONG, for data_to_send()
        self._initiated = self._established = self._eof = self._closed = False
        self._we_left = self._they_left = False  # a GOODBYE was sent / received
        self._failure: tuple[type[PmqError], str] | None = None
        self._hello: Sequence[Any] = ()  # the peer's HELLO, not trusted before Established
        self._names: set[str] = set()  # module and method names check_calls found valid
        self._out, self._in = _Flow(), _Flow()  # what we send, what the peer sends
        self._receivers: dict[int, Callable[[Sequence[Any]], Event | None]] = {
            HELLO: self._on_hello,
            AUTH: self._on_auth,
            BATCH: self._on_batch,
            ACK: self._on_ack,
            REQUEST: self._on_request,
            RESPONSE: self._on_response,
            PING: self._on_ping,
            PONG: lambda message: Pong(),
            GOODBYE: self._on_goodbye,
        }
        self._senders: dict[type, Callable[[Any], bytes]] = {
            Batch: self._send_batch,
            Ack: self._send_ack,
            Request: self._send_request,
            Response: self._send_response,
            Ping: lambda event: self._frame([PING]),
            Goodbye: self._send_goodbye,
        }

    @property
    def state(self) -> Literal["handshake", "open", "closed"]:
        """``"handshake"``, ``"open"`` once Established, ``"closed"`` after an error,
        ConnectionClosed or a GOODBYE either way."""
        if self._failure or self._closed or self._we_left or self._they_left:
            return "closed"
        return "open" if self._established else "handshake"

    @property
    def may_answer(self) -> bool:
        """Whether ACKs and RESPONSEs may be sent: while open, and after the peer closed its
        side cleanly (EOF between frames, no GOODBYE): a half-closed peer still reads, and
        learns what became of what it sent before."""
        if self.state == "open":
            return True
        return (self._closed and self._established and self._failure is None
                and not self._we_left and not self._they_left)

    def in_flight(self) -> tuple[int, int]:
        """``(calls, bytes of arguments)`` sent in BATCHes, not yet covered by a received ACK."""
        return self._out.calls, self._out.bytes

    def room(self) -> tuple[int, int]:
        """``(calls, bytes)`` the peer's window still allows; ``(0, 0)`` before Established."""
        return self.peer_window_calls - self._out.calls, self.peer_window_bytes - self._out.bytes

    def abandon(self, rpc_id: int) -> None:
        """Stop waiting for the RESPONSE to our REQUEST `rpc_id` (the caller timed out): it no
        longer counts against MAX_CONCURRENT_REQUESTS; a RESPONSE that still comes is passed on
        as usual, and the caller drops it."""
        self._out.requests.discard(rpc_id)

    def initiate(self) -> bytes:
        """Start the handshake: call once, as soon as the socket is up, on both sides.

        Returns:
            The bytes of our HELLO, to write before anything else.

        Raises:
            LocalProtocolError: called a second time.
        """
        if self._initiated:
            raise LocalProtocolError("initiate() was already called")
        self._initiated = True
        uses_secret = self._secret is not None
        hello = [HELLO, PROTOCOL_VERSION, self.cage, self.journal_id, self._nonce, uses_secret]
        return self._frame([*hello, self.window_calls, self.window_bytes])

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Hand over bytes read from the socket; ``b""`` means the peer closed it (EOF).

        Raises:
            TypeError: ``data`` is not bytes-like.
            LocalProtocolError: more data after EOF.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() after EOF")
        elif not data:
            self._eof = True
        elif self._failure is None:  # after a failure nothing more is read
            if self._start:
                del self._buffer[: self._start]
                self._start = 0
            self._buffer += data

    def data_to_send(self) -> bytes:
        """The bytes the protocol itself must write (AUTH, PONG), cleared once returned."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def next_event(self) -> Event | NeedData:
        """The next thing the peer said, one event per call.

        Returns:
            An event; ``NEED_DATA`` when more bytes are needed; ``ConnectionClosed``, on every
            call, once the peer closed between two frames. After every call, whatever it
            returned, write out ``data_to_send()``: the peer's HELLO (with a secret) queues our
            AUTH there without returning an event, and a PING queues a PONG.

        Raises:
            RemoteProtocolError: the peer broke the protocol: a malformed, oversized or
                out-of-order message, a window overrun, EOF in the middle of a frame.
            AuthenticationError: wrong secret, secret on one side only, or an unexpected name.
            LocalProtocolError: ``initiate()`` was not called yet.
        """
        if self._failure is not None:
            error_type, message = self._failure
            raise error_type(f"the connection already failed: {message}")
        if not self._initiated:
            raise LocalProtocolError("call initiate() before next_event()")
        try:
            while True:
                buffer, start = self._buffer, self._start
                available = len(buffer) - start
                if available >= 4:
                    (size,) = HEADER.unpack_from(buffer, start)
                    if not 0 < size <= self.max_frame_bytes:
                        raise Invalid(
                            f"frame of {size} bytes announced; "
                            f"a frame body is 1 .. {self.max_frame_bytes} bytes"
                        )
                    if size > HANDSHAKE_MAX_FRAME_BYTES and not self._established:
                        raise Invalid(
                            f"frame of {size} bytes announced before the handshake completed; "
                            f"until then a frame body is 1 .. {HANDSHAKE_MAX_FRAME_BYTES} bytes"
                        )
                    if available >= 4 + size:
                        self._start = start + 4 + size
                        with memoryview(buffer) as view, view[start + 4 : self._start] as body:
                            event = self._on_frame(body)
                        if event is None:
                            continue
                        return event
                if not self._eof:
                    return NEED_DATA
                if available:
                    raise Invalid("connection closed in the middle of a frame")
                self._closed = True
                return ConnectionClosed()
        except Invalid as error:
            self._failure = (RemoteProtocolError, str(error))
            raise RemoteProtocolError(str(error)) from None
        except AuthenticationError as error:
            self._failure = (AuthenticationError, str(error))
            raise

    def send(self, event: SendEvent) -> bytes:
        """Encode an application message.

        Args:
            event: a Batch, Ack, Request, Response, Ping or Goodbye. Goodbye may be sent once in
                any state (even after an error); the others only while ``state == "open"``.

        Returns:
            The bytes to write. Nothing changes unless the message was accepted.

        Raises:
            TypeError: ``event`` is not one of those types.
            LocalProtocolError: the message breaks the rules (see the module docstring): wrong
                state, malformed fields, over the peer's window or the frame limit, keys not
                increasing, an ACK.high going down, an unknown or repeated rpc_id.
        """
        name = type(event).__name__
        sender = self._senders.get(type(event))
        if sender is None:
            raise TypeError(
                f"send() takes Batch, Ack, Request, Response, Ping or Goodbye, not {name}"
            )
        if self._we_left:
            raise LocalProtocolError(f"cannot send {name}: GOODBYE was already sent")
        if type(event) is not Goodbye and self.state != "open" and not (
                type(event) in _ANSWERS and self.may_answer):
            if self._failure is not None:
                why = f"the connection failed ({self._failure[1]})"
            else:
                why = "the connection is closed" if self._established else "before Established"
            raise LocalProtocolError(f"cannot send {name} {why}")
        try:
            return sender(event)
        except Invalid as error:
            raise LocalProtocolError(str(error)) from None

    # Receiving: _on_frame gets a body; each raises Invalid or AuthenticationError.

    def _on_frame(self, body: memoryview) -> Event | None:
        message = decode(body)
        kind = message[0]
        name = NAMES[kind]
        if self._they_left:
            raise Invalid(f"{name} after GOODBYE")
        if kind == HELLO:
            if self._hello:
                raise Invalid("a second HELLO")
            version = message[1] if len(message) > 1 else PROTOCOL_VERSION
            if type(version) is int and version != PROTOCOL_VERSION:
                raise Invalid(
                    f"the peer speaks pmq protocol version {version}, "
                    f"this cage speaks version {PROTOCOL_VERSION}"
                )
        elif kind == AUTH:
            if not self._hello:
                raise Invalid("AUTH before HELLO")
            if self._established:
                raise Invalid("AUTH after the handshake completed")
        elif kind != GOODBYE and not self._established:
            raise Invalid(f"{name} before the handshake completed")
        _check_message(kind, message)
        return self._receivers[kind](message)

    def _on_hello(self, message: Sequence[Any]) -> Event | None:
        peer, nonce, uses_secret = message[2], message[4], message[5]
        if self._expect_peer is not None and peer != self._expect_peer:
            raise AuthenticationError(
                f"expected cage {self._expect_peer!r}, peer says it is {peer!r}"
            )
        if uses_secret != (self._secret is not None):
            if uses_secret:
                raise AuthenticationError(f"peer {peer!r} uses a secret, but this cage has none")
            raise AuthenticationError(f"this cage uses a secret, but peer {peer!r} has none")
        self._hello = message
        if self._secret is None:
            return self._establish()
        proof = self._proof(self.role, self.cage, peer, nonce + self._nonce)
        self._outgoing += self._frame([AUTH, proof])
        return None

    def _on_auth(self, message: Sequence[Any]) -> Event | None:
        role = "server" if self.role == "client" else "client"
        peer, nonce = self._hello[2], self._hello[4]
        expected = self._proof(role, peer, self.cage, self._nonce + nonce)
        if not hmac.compare_digest(message[1], expected):
            raise AuthenticationError(f"wrong secret from peer {peer!r}")
        return self._establish()

    def _proof(self, role: str, prover: str, verifier: str, nonces: bytes) -> bytes:
        """What ``prover`` in ``role`` sends; ``nonces`` are the verifier's then the prover's."""
        assert self._secret is not None  # only called once both sides said they use one
        text = _AUTH_CONTEXT + role[0].encode() + prover.encode() + b"\0" + verifier.encode()
        return hmac.new(self._secret, text + b"\0" + nonces, hashlib.sha256).digest()

    def _establish(self) -> Established:
        self._established = True
        _, _, self.peer, self.peer_journal_id, _, _, calls, nbytes = self._hello
        self.peer_window_calls, self.peer_window_bytes = calls, nbytes
        return Established(self.peer, self.peer_journal_id, calls, nbytes)

    def _on_batch(self, message: Sequence[Any]) -> Event | None:
        _, settled, calls = message
        last, nbytes = check_calls(calls, self._in.key, self._names)
        calls = list(calls)  # of plain tuples (see WireCall)
        window = (self.window_calls, self.window_bytes)
        counted, counted_bytes = self._in.admit(settled, calls, nbytes, window, "peer sent")
        self._in.add(settled, last, counted, counted_bytes)
        return Batch(settled, calls)

    def _on_ack(self, message: Sequence[Any]) -> Event | None:
        _, high, refused = message
        self._out.check_ack(high, refused)
        self._out.release(high)
        return Ack(high, [(key, reason) for key, reason in refused])

    def _on_request(self, message: Sequence[Any]) -> Event | None:
        self._in.check_request(message[1])
        self._in.requests.add(message[1])
        return Request(*message[1:])

    def _on_response(self, message: Sequence[Any]) -> Event | None:
        _, rpc_id, ok, result = message
        self._out.requests.discard(rpc_id)
        if ok:
            return Response(rpc_id, True, result, None)
        remote_type, text, traceback = result
        return Response(rpc_id, False, None, (remote_type, text, traceback))

    def _on_ping(self, message: Sequence[Any]) -> Event | None:
        self._outgoing += PONG_FRAME
        return Ping()

    def _on_goodbye(self, message: Sequence[Any]) -> Event | None:
        self._they_left = True
        return Goodbye(message[1])

    # Sending: each checks, then frames, then changes the state; or raises Invalid.

    def _send_batch(self, event: Batch) -> bytes:
        message = [BATCH, event.settled, event.calls]
        _check_message(BATCH, message)
        last, nbytes = check_calls(event.calls, self._out.key, self._names)
        window = (self.peer_window_calls, self.peer_window_bytes)
        who = "BATCH would make"
        counted, counted_bytes = self._out.admit(event.settled, event.calls, nbytes, window, who)
        data = self._frame(message)
        self._out.add(event.settled, last, counted, counted_bytes)
        return data

    def _send_ack(self, event: Ack) -> bytes:
        message = [ACK, event.high, event.refused]
        _check_message(ACK, message)
        self._in.check_ack(event.high, event.refused)
        data = self._frame(message)
        self._in.release(event.high)
        return data

    def _send_request(self, event: Request) -> bytes:
        message = [REQUEST, *map(partial(getattr, event), _REQUEST_FIELDS)]
        _check_message(REQUEST, message)
        self._out.check_request(event.rpc_id)
        data = self._frame(message)
        self._out.requests.add(event.rpc_id)
        return data

    def _send_response(self, event: Response) -> bytes:
        if (event.error if event.ok else event.result) is not None:
            raise Invalid("RESPONSE: ok=True takes a result and no error, ok=False the reverse")
        message = [RESPONSE, event.rpc_id, event.ok, event.result if event.ok else event.error]
        _check_message(RESPONSE, message)
        if event.rpc_id not in self._in.requests:
            raise Invalid(f"RESPONSE: no REQUEST with rpc_id {event.rpc_id} is waiting for one")
        data = self._frame(message)
        self._in.requests.discard(event.rpc_id)
        return data

    def _send_goodbye(self, event: Goodbye) -> bytes:
        message = [GOODBYE, event.reason]
        _check_message(GOODBYE, message)
        data = self._frame(message)
        self._we_left = True
        return data


_REQUEST_FIELDS = ("rpc_id", "module", "method", "arguments", "timeout")
