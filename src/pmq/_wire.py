"""The pmq wire format: the layout of a frame, the message types and the shape of each message.

Owns: the bytes of one frame (DESIGN.md §5): its 4-byte header, the msgpack of its body, the
number of every message type, and the checks of one message's fields and types, each refusal
naming the message and the field and saying what is wrong with it. Must not: keep the state of a
connection (the caller hands in what a check needs: the last key seen, its set of names already
checked, its limits), know the handshake, the order of messages or flow control (``pmq.protocol``
owns those), touch sockets, asyncio, clocks or the disk, log, decode call arguments (they stay
opaque bytes for ``pmq._codec``), or import anything but the standard library, msgpack and
``pmq._names``.

Wire format. A frame is a 4-byte big-endian body length N (1 <= N <= max_frame_bytes), then N
bytes of msgpack: an array whose first item is the message type. Ints are 0 .. 2**63-1; times
and timeouts are seconds (float, or int), finite and >= 0::

    HELLO    [1, version, cage, journal_id (16 bytes), nonce (32 bytes), uses_secret,
              window_calls, window_bytes]
    AUTH     [2, proof (32 bytes)]
    BATCH    [3, settled, [[key, module, method, arguments, user_id|nil, deadline|nil, created]]]
    ACK      [4, high, [[key, reason], ...]]
    REQUEST  [5, rpc_id, module, method, arguments, timeout|nil]
    RESPONSE [6, rpc_id, true, result] or [6, rpc_id, false, [remote_type, message, traceback]]
    PING [7]    PONG [8]    GOODBYE [9, reason]

Invariants:
- Whatever the value, a checker returns None or what is wrong with it ("is str, expected
  bytes"), and a function here that refuses raises only ``Invalid``, never ``KeyError``,
  ``IndexError``, ``TypeError``... ``pmq.protocol`` turns ``Invalid`` into
  ``RemoteProtocolError`` for what was received and ``LocalProtocolError`` for what is to be
  sent, so both directions pass the very same checks.
- ``decode`` bounds every length msgpack honours inside a body by the body's size, and the
  nesting by msgpack's fixed stack, so no body makes it allocate or recurse without bound.
- ``check_calls`` has a fast path (one boolean expression of type checks per call, the hot loop
  behind the speed figures in ``pmq.protocol``) and a slow path (``_CALL``) that only explains a
  refusal: the two must accept exactly the same calls.
- The limits on strings and on refusals are ``pmq.protocol``'s public constants, handed to
  ``message_checker``; the sizes defined here are those of the layout only.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeAlias

import msgpack  # type: ignore[import-untyped, unused-ignore]  # msgpack ships no type information

from pmq._names import MAX_CALL_ID_CHARS, check_cage_name, check_call_id, check_identifier

__all__ = [
    "ACK",
    "AUTH",
    "BATCH",
    "GOODBYE",
    "HEADER",
    "HELLO",
    "ID_BYTES",
    "NAMES",
    "NONCE_BYTES",
    "PING",
    "PONG",
    "PONG_FRAME",
    "PROOF_BYTES",
    "REQUEST",
    "RESPONSE",
    "UINT_LIMIT",
    "Invalid",
    "check_calls",
    "decode",
    "encoder",
    "message_checker",
]

# Message types (the first item of every body).
HELLO, AUTH, BATCH, ACK, REQUEST, RESPONSE, PING, PONG, GOODBYE = range(1, 10)
NAMES = {1: "HELLO", 2: "AUTH", 3: "BATCH", 4: "ACK", 5: "REQUEST", 6: "RESPONSE", 7: "PING"}
NAMES |= {8: "PONG", 9: "GOODBYE"}

#: The frame header: the body's length, 4 bytes big-endian.
HEADER = struct.Struct(">I")
#: Every int on the wire is below this.
UINT_LIMIT = 2**63
ID_BYTES, NONCE_BYTES, PROOF_BYTES = 16, 32, 32
_INF = float("inf")
#: Distinct module/method names a connection remembers as checked (bounds its memory).
_MAX_CACHED_NAMES = 4096

_Checker: TypeAlias = Callable[[Any], "str | None"]


class Invalid(Exception):
    """A message breaks the rules: RemoteProtocolError when received, LocalProtocolError sent."""


# Checkers: each says what is wrong with a value (e.g. "is str, expected bytes"), or None.


def _kind(value: object) -> str:
    if value is None:
        return "nil"
    return "array" if type(value) is tuple else type(value).__name__


def _expected(value: object, what: str) -> str:
    return f"is {_kind(value)}, expected {what}"


def _int(value: Any) -> str | None:
    return None if type(value) is int else _expected(value, "int")


def _uint(value: Any) -> str | None:
    if type(value) is not int:
        return _expected(value, "int")
    return None if 0 <= value < UINT_LIMIT else f"is {value}, outside 0 .. 2**63-1"


def _positive(value: Any) -> str | None:
    return _uint(value) or (None if value > 0 else "is 0, expected at least 1")


def _bool(value: Any) -> str | None:
    return None if type(value) is bool else _expected(value, "bool")


def _bytes(value: Any) -> str | None:
    return None if type(value) is bytes else _expected(value, "bytes")


def _bytes_of(size: int) -> _Checker:
    def check(value: Any) -> str | None:
        if type(value) is not bytes:
            return _expected(value, f"{size} bytes")
        return None if len(value) == size else f"has {len(value)} bytes, expected {size}"

    return check


def _text(limit: int) -> _Checker:
    """A checker of a str of at most ``limit`` characters."""

    def check(value: Any) -> str | None:
        if type(value) is not str:
            return _expected(value, "str")
        n = len(value)
        return None if n <= limit else f"has {n} characters, at most {limit}"

    return check


def _seconds(value: Any) -> str | None:
    if type(value) is not float and type(value) is not int:
        return _expected(value, "float")
    return None if 0.0 <= value < _INF else f"is {value!r}, expected a finite number >= 0"


def _optional(check: _Checker) -> _Checker:
    return lambda value: None if value is None else check(value)


def _name(rule: Callable[[str], object]) -> _Checker:
    def check(value: Any) -> str | None:
        if type(value) is not str:
            return _expected(value, "str")
        try:
            rule(value)
        except ValueError as error:
            return f"is not allowed: {error}"
        return None

    return check


def _array(value: Any) -> str | None:
    return None if isinstance(value, list | tuple) else _expected(value, "array")


def _record(*fields: tuple[str, _Checker]) -> _Checker:
    """A checker of an array holding exactly these fields, in this order."""
    names = ", ".join(name for name, _ in fields)

    def check(value: Any) -> str | None:
        if not isinstance(value, list | tuple):  # tuples only come from send()
            return _expected(value, f"an array ({names})")
        if len(value) != len(fields):
            return f"has {len(value)} fields, expected {len(fields)} ({names})"
        for (name, check_field), item in zip(fields, value, strict=True):
            problem = check_field(item)
            if problem:
                return f"{name} {problem}"
        return None

    return check


def _entries(check: _Checker, limit: int) -> _Checker:
    """A checker of an array of at most ``limit`` entries that each pass ``check``."""

    def check_all(value: Any) -> str | None:
        problem = _array(value)
        if problem:
            return problem
        if len(value) > limit:
            return f"has {len(value)} entries, at most {limit}"
        for index, entry in enumerate(value):
            problem = check(entry)
            if problem:
                return f"entry {index}: {problem}"
        return None

    return check_all


_module = _name(partial(check_identifier, "module"))
_method = _name(partial(check_identifier, "method"))
_CALL = _record(
    ("key", _uint),
    ("module", _module),
    ("method", _method),
    ("arguments", _bytes),
    ("user_id", _optional(_name(check_call_id))),
    ("deadline", _optional(_seconds)),
    ("created", _seconds),
)


def message_checker(max_str_chars: int, max_refused: int) -> Callable[[int, Sequence[Any]], None]:
    """The check of a message's fields (not the calls of a BATCH), under these limits.

    Args:
        max_str_chars: the longest refusal reason, GOODBYE reason, and remote error type,
            message or traceback.
        max_refused: the most refusals one ACK may carry.

    Returns:
        ``check(kind, message)``, for a ``message`` whose type ``kind`` is known; it raises
        ``Invalid``, naming the message and the field, when a field is missing or wrong.
    """
    text = _text(max_str_chars)
    error = _record(("remote_type", text), ("message", text), ("traceback", text))
    fields: dict[int, _Checker] = {  # the fields after the type; BATCH calls are checked apart
        HELLO: _record(
            ("version", _int),
            ("cage", _name(check_cage_name)),
            ("journal_id", _bytes_of(ID_BYTES)),
            ("nonce", _bytes_of(NONCE_BYTES)),
            ("uses_secret", _bool),
            ("window_calls", _positive),
            ("window_bytes", _positive),
        ),
        AUTH: _record(("proof", _bytes_of(PROOF_BYTES))),
        BATCH: _record(("settled", _uint), ("calls", _array)),
        ACK: _record(
            ("high", _uint),
            ("refused", _entries(_record(("key", _uint), ("reason", text)), max_refused)),
        ),
        REQUEST: _record(
            ("rpc_id", _uint),
            ("module", _module),
            ("method", _method),
            ("arguments", _bytes),
            ("timeout", _optional(_seconds)),
        ),
        RESPONSE: _record(("rpc_id", _uint), ("ok", _bool), ("result", lambda result: None)),
        PING: _record(),
        PONG: _record(),
        GOODBYE: _record(("reason", text)),
    }

    def check_message(kind: int, message: Sequence[Any]) -> None:
        problem = fields[kind](message[1:])
        if problem is None and kind == RESPONSE:
            problem = (_bytes if message[2] else error)(message[3])
            problem = problem and f"result {problem}"
        if problem:
            raise Invalid(f"{NAMES[kind]}: {problem}")

    return check_message


def check_calls(calls: Sequence[Any], last_key: int, names: set[str]) -> tuple[int, int]:
    """Check the calls of a BATCH, whose keys must rise from above ``last_key``.

    The fast path is one expression of type checks per call, module and method names looked up
    in ``names``, the connection's set of names already checked (and added to it while there is
    room); ``_call_problem`` explains a call that fails it.

    Returns:
        The last key and the total bytes of the calls' arguments.

    Raises:
        Invalid: a call is malformed or its key is not above the one before it.
    """
    nbytes = 0
    for index, call in enumerate(calls):
        if isinstance(call, list | tuple) and len(call) == 7:
            key, module, method, arguments, user_id, deadline, created = call
            if (
                type(key) is int
                and last_key < key < UINT_LIMIT
                and type(module) is str
                and (module in names or _learn(names, module))
                and type(method) is str
                and (method in names or _learn(names, method))
                and type(arguments) is bytes
                and (
                    user_id is None
                    or (
                        type(user_id) is str
                        and 0 < len(user_id) <= MAX_CALL_ID_CHARS
                        and user_id.isprintable()
                    )
                )
                and (
                    deadline is None
                    or (
                        (type(deadline) is float or type(deadline) is int)
                        and 0.0 <= deadline < _INF
                    )
                )
                and (type(created) is float or type(created) is int)
                and 0.0 <= created < _INF
            ):
                last_key = key
                nbytes += len(arguments)
                continue
        raise Invalid(_call_problem(index, call, last_key))
    return last_key, nbytes


def _learn(names: set[str], name: str) -> bool:
    """Whether ``name`` may name a module or method; added to ``names`` if so, while room lasts."""
    try:
        check_identifier("module", name)
    except ValueError:
        return False
    if len(names) < _MAX_CACHED_NAMES:
        names.add(name)
    return True


def _call_problem(index: int, call: Any, last_key: int) -> str:
    """What is wrong with one BATCH call: the slow path, once the fast check has failed."""
    where = f"BATCH call {index}"
    if isinstance(call, list | tuple) and call and type(call[0]) is int:
        where += f" (key {call[0]})"
    problem = _CALL(call) or f"key is not above the previous key {last_key} on this connection"
    return f"{where}: {problem}"


# Encoding and decoding one body.


def encoder(max_frame_bytes: int) -> Callable[[list[Any]], bytes]:
    """The encoder of one connection's messages, with its own msgpack packer.

    Returns:
        ``encode(message)``: the whole frame, header and body (bytes as msgpack bin); it raises
        ``Invalid`` when the body would be over ``max_frame_bytes``.
    """
    pack = msgpack.Packer(use_bin_type=True).pack

    def encode(message: list[Any]) -> bytes:
        body: bytes = pack(message)
        if len(body) > max_frame_bytes:
            raise Invalid(
                f"{NAMES[message[0]]} takes {len(body)} bytes, "
                f"over the frame limit of {max_frame_bytes} bytes"
            )
        return HEADER.pack(len(body)) + body

    return encode


def decode(body: memoryview) -> tuple[Any, ...]:
    """The message in one frame body: an array whose first item is a known message type.

    Only its type is checked here; ``message_checker`` checks its fields. Arrays decode as
    tuples: the garbage collector stops tracking a tuple that holds only plain values, and a
    BATCH brings thousands of them (lists it tracks for as long as they live, which cost the
    receiving cage a sixth of its time in collections).

    Raises:
        Invalid: the body is not msgpack, holds an extension type, is not an array that starts
            with an int, or the int is no message type.
    """
    size = len(body)
    try:
        limits = dict.fromkeys(_MSGPACK_LIMITS, size)  # no length beyond the body's size
        message = msgpack.unpackb(
            body, raw=False, strict_map_key=True, use_list=False, ext_hook=_refuse_ext, **limits
        )
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        # Name the message when the body starts like one: a short array, then a known type.
        known = size > 1 and body[0] & 0xF0 == 0x90
        what = NAMES.get(body[1], "message") if known else "message"
        detail = str(error) or type(error).__name__
        raise Invalid(f"malformed {what} ({size} bytes): {detail}") from None
    if type(message) is not tuple or not message or type(message[0]) is not int:
        first = _kind(message[0]) if type(message) is tuple and message else "nothing"
        got = f"an array starting with {first}" if type(message) is tuple else _kind(message)
        raise Invalid(f"a message is an array starting with its type (an int), not {got}")
    if message[0] not in NAMES:
        raise Invalid(f"unknown message type {message[0]}")
    return message


def _refuse_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code} is not allowed")


_MSGPACK_LIMITS = ("max_str_len", "max_bin_len", "max_array_len", "max_map_len", "max_ext_len")
#: A whole PONG frame: the protocol answers every PING with it.
PONG_FRAME = HEADER.pack(2) + msgpack.packb([PONG])
