"""The encoding of call arguments: ``(args, kwargs)`` to msgpack bytes and back. Never pickle.

Owns: which Python values may travel as arguments, the bytes they become, and the checks that
make untrusted bytes safe to decode. Must not: import anything of pmq's or any third-party module
but msgpack, know about calls, queues or frames, or limit sizes (the store and the protocol know
how big a call may be; this module only promises that decoding never allocates more than the
input can describe).

What may travel (the same rule on both ends, DESIGN.md §5 "never pickle"):
- ``None``, ``bool``, ``int`` from -2**63 to 2**64 - 1, ``float``, ``str``, ``bytes``;
- ``list`` and ``tuple`` (a tuple arrives as a list, as in JSON);
- ``dict`` whose keys are ``str`` or ``bytes`` (int keys are refused: ``{1: x}`` and
  ``{True: x}`` are one key in Python and two in msgpack, and msgpack's own
  ``strict_map_key`` guard against hash flooding allows only these two);
- containers nested at most ``MAX_DEPTH`` deep within one argument (``[[1]]`` is depth 2);
- exact types only: a subclass (an ``IntEnum``, a namedtuple, an ``OrderedDict``) is refused
  rather than silently arriving as its base type; so are ``bytearray``, ``memoryview`` and
  msgpack's own extension types.

Invariants:
- ``unpack_arguments(pack_arguments(a, kw))`` gives back ``a`` (as a list) and ``kw``, equal value
  for value with tuples turned into lists; whatever ``pack_arguments`` accepts,
  ``unpack_arguments`` accepts, so a stored call can always be decoded by its target.
- ``pack_arguments`` raises ``TypeError`` (a value msgpack cannot carry) or ``ValueError`` (nested
  too deep) naming the exact path of the first offending value, e.g. ``kwargs['when']`` or
  ``args[1][0]['x']``, its type, and what to pass instead.
- ``unpack_arguments`` raises only ``ValueError`` (or ``TypeError`` for a non-bytes argument):
  every length it honours is bounded by the input's size, and msgpack's decoder has a fixed
  stack, so no input makes it allocate or recurse without bound.

Speed: msgpack's packer cannot be the check (it also takes int, float and None keys, extension
types, ``bytearray`` and 511 levels of nesting, which the target would refuse or get changed), so
the checks run first, as C loops where they can (``frozenset.issuperset(map(type, ...))`` over a
container's items; a big container is checked breadth first, one level of all its containers at
a time); the value is then packed by a per-thread msgpack ``Packer``. The walk that builds a path
runs only when something is wrong. Decoding runs the depth and timestamp check only when a cheap
scan of the bytes says the input could break them (more container headers than ``MAX_DEPTH``
allows, or a timestamp's type bytes). Measured on a slow 2-core machine: a small call packs in
about 1 µs (msgpack alone: 0.4 µs); 1,000 flat records take about 2.5 times msgpack's time, and
1,000 nested ones about 3 times, both ways.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import threading
from collections.abc import Collection, Mapping
from itertools import chain
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]  # msgpack ships no type information

_unpackb = msgpack.unpackb

__all__ = ["MAX_DEPTH", "pack_arguments", "pack_call_arguments", "unpack_arguments"]

#: How deeply containers may nest within one argument.
MAX_DEPTH = 64

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1
_SCALARS: frozenset[type] = frozenset({type(None), bool, int, float, str, bytes})
_KEY_TYPES: frozenset[type] = frozenset({str, bytes})
_STR_ONLY: frozenset[type] = frozenset({str})
_SEQUENCE_TYPES: frozenset[type] = frozenset({list, tuple})
_ALLOWED_TYPES: frozenset[type] = _SCALARS | _SEQUENCE_TYPES | {dict}
#: From this many items on, a container that holds containers is checked breadth first.
_MANY = 16
#: Up to this many arguments, a call's are type-checked by a Python loop (see pack_call_arguments).
_FEW = 8
#: The type bytes of msgpack arrays and maps: every container starts with one of them.
_CONTAINER_BYTES = bytes(range(0x80, 0xA0)) + b"\xdc\xdd\xde\xdf"
#: A timestamp extension (type -1) as fixext 4, fixext 8 or ext 8 of 12 bytes. msgpack decodes
#: these itself, without asking ``ext_hook``. (A regex would be ten times slower than testing for
#: 0xff, which most inputs lack, then for each head.)
_TIMESTAMP_HEADS = (b"\xd6\xff", b"\xd7\xff", b"\xc7\x0c\xff")

_ALLOWED = "None, bool, int, float, str, bytes, list, tuple and dict"


class _ThreadPacker(threading.local):
    """One msgpack ``Packer`` per thread: a Packer owns a buffer and is not thread-safe."""

    def __init__(self) -> None:
        self.packer = msgpack.Packer(use_bin_type=True, autoreset=True)


_packers = _ThreadPacker()


def pack_arguments(args: tuple[Any, ...] | list[Any], kwargs: Mapping[str, Any]) -> bytes:
    """Encode a call's positional and keyword arguments as msgpack.

    Args:
        args: the positional arguments, as the call received them.
        kwargs: the keyword arguments; keys must be str.

    Returns:
        The msgpack encoding of ``[list(args), dict(kwargs)]``.

    Raises:
        TypeError: ``args`` is not a tuple or list, ``kwargs`` is not a mapping with str keys,
            or a value cannot travel (see the module docstring); the message names its path,
            e.g. ``cannot serialize kwargs['when'] (a datetime.datetime): ...``.
        ValueError: containers nest more than ``MAX_DEPTH`` deep within one argument.
    """
    if type(args) is not tuple and type(args) is not list:
        raise TypeError(f"args must be a tuple or a list, not {type(args).__name__}")
    if type(kwargs) is dict:
        named: dict[str, Any] = kwargs
    elif isinstance(kwargs, Mapping):
        named = dict(kwargs)
    else:
        raise TypeError(f"kwargs must be a dict, not {type(kwargs).__name__}")
    if not _STR_ONLY.issuperset(map(type, named)):
        key = next(k for k in named if type(k) is not str)
        raise TypeError(
            f"kwargs key {key!r:.60} is {_a(type(key))}: keyword argument names must be str"
        )
    values = named.values()
    # Flat arguments, the common case, pass two C-level type checks without a Python call.
    if not (_SCALARS.issuperset(map(type, args)) and _SCALARS.issuperset(map(type, values))) and (
        not (_fit(args, 1) and _fit(values, 1))
    ):
        raise _describe(args, named, for_unpack=False)
    try:
        packed: bytes = _packers.packer.pack([args, named])
    except (OverflowError, TypeError, ValueError):
        # Only an int out of msgpack's range gets past the checks above; _describe finds it.
        raise _describe(args, named, for_unpack=False) from None
    return packed


def pack_call_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """``pack_arguments`` for what a Python call received as ``*args, **kwargs``.

    The shapes are already right there: a tuple, and a dict whose keys Python made sure are
    str (a str subclass given with ``**`` is still a keyword's name, packed as its text), so
    flat arguments, the common case, are checked by a type scan (``_flat``) and packed;
    anything else takes ``pack_arguments``' full path, with its messages.
    """
    if _flat(args, kwargs):
        try:
            packed: bytes = _packers.packer.pack([args, kwargs])
            return packed
        except (OverflowError, TypeError, ValueError):
            pass  # an int out of range: the full path names it
    return pack_arguments(args, kwargs)


def unpack_arguments(data: bytes | bytearray | memoryview) -> tuple[list[Any], dict[str, Any]]:
    """Decode what ``pack_arguments`` made, from a source that may be broken or hostile.

    Args:
        data: the encoded arguments.

    Returns:
        ``(args, kwargs)``: the positional arguments as a list, the keyword arguments as a dict.

    Raises:
        TypeError: ``data`` is not bytes-like.
        ValueError: ``data`` is not the encoding of ``[list, dict]`` holding only values that
            ``pack_arguments`` accepts: truncated, trailing bytes, invalid msgpack or UTF-8, a
            length beyond the input, non-str keyword names, extension types, or containers
            nested deeper than ``MAX_DEPTH``.
    """
    if type(data) is not bytes:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        data = bytes(data)
    try:
        # unpackb bounds every length by the input's size itself (max_*_len default to it in
        # msgpack >= 1.0; tests/test_codec.py holds it to that): naming them cost a fifth of
        # the decoding, which every call pays.
        value = _unpackb(data, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except ValueError as error:  # every msgpack decoding error is a ValueError
        detail = str(error) or type(error).__name__
        raise ValueError(f"malformed call arguments ({len(data)} bytes): {detail}") from error
    if type(value) is not list or len(value) != 2:
        raise _not_a_pair(data, value)
    args, kwargs = value
    if type(args) is not list or type(kwargs) is not dict:
        raise _not_a_pair(data, value)
    size = len(data)
    # One pass checks the keyword names and whether every value is a scalar (a plain loop for a
    # call's usual handful: see _flat). Flat arguments hold no container and no msgpack
    # Timestamp, so nothing can be too deep and the scans of the bytes below (a translate() per
    # call cost 0.7 µs on any call over 66 bytes) are not needed.
    if len(args) + len(kwargs) <= _FEW:
        flat = True
        for value in args:
            if type(value) not in _SCALARS:
                flat = False
        for key, value in kwargs.items():
            if type(key) is not str:
                raise _not_a_name(data, key)
            if type(value) not in _SCALARS:
                flat = False
    else:
        if not _STR_ONLY.issuperset(map(type, kwargs)):
            raise _not_a_name(data, next(k for k in kwargs if type(k) is not str))
        flat = _flat(args, kwargs)
    if flat:
        return args, kwargs
    possibly_deep = (
        size > MAX_DEPTH + 2 and size - len(data.translate(None, _CONTAINER_BYTES)) > MAX_DEPTH + 2
    )
    maybe_timestamp = b"\xff" in data and any(head in data for head in _TIMESTAMP_HEADS)
    if (possibly_deep or maybe_timestamp) and not (_fit(args, 1) and _fit(kwargs.values(), 1)):
        problem = _describe(args, kwargs, for_unpack=True)
        raise ValueError(f"malformed call arguments ({size} bytes): {problem}")
    return args, kwargs


def _flat(args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> bool:
    """Whether every value in `args` and `kwargs` is a scalar that may travel (no container).

    A few values are checked by a plain loop: ``issuperset`` builds a set of its argument first,
    which made two C-level scans twice as slow as the loop for a call's usual handful.
    """
    if len(args) + len(kwargs) > _FEW:
        return _SCALARS.issuperset(map(type, args)) and _SCALARS.issuperset(
            map(type, kwargs.values()))
    for value in args:
        if type(value) not in _SCALARS:
            return False
    for value in kwargs.values():  # noqa: SIM110 (all() over a generator is slower)
        if type(value) not in _SCALARS:
            return False
    return True


def _not_a_name(data: bytes, key: object) -> ValueError:
    return ValueError(f"malformed call arguments ({len(data)} bytes): keyword name {key!r:.60} "
                      f"is not a str")


def _not_a_pair(data: bytes, value: object) -> ValueError:
    return ValueError(f"malformed call arguments ({len(data)} bytes): expected [args list, "
                      f"kwargs map], got {_summary(value)}")


def _refuse_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code} is not allowed in call arguments")


def _fit(items: Collection[Any], depth: int) -> bool:
    """Whether every value in ``items`` may travel, containers among them being at ``depth``.

    The fast check: no path, no message, and no int range check (the packer does that). It
    walks depth first through small containers; a big one is handed to ``_fit_level``.
    """
    if _SCALARS.issuperset(map(type, items)):
        return True
    if depth > MAX_DEPTH:
        return False
    if len(items) >= _MANY:
        return _fit_level([items], depth)
    for item in items:
        kind = type(item)
        if kind in _SCALARS:
            continue
        if kind is dict:
            if not _KEY_TYPES.issuperset(map(type, item)):
                return False
            item = item.values()
        elif kind is not list and kind is not tuple:
            return False
        # A flat container is checked here, without a call; a nested one recursively.
        if not (_SCALARS.issuperset(map(type, item)) or _fit(item, depth + 1)):
            return False
    return True


def _fit_level(level: list[Collection[Any]], depth: int) -> bool:
    """``_fit`` for big values: breadth first, one level of all containers at a time.

    Each level is flattened and type-checked by C loops (``chain``, ``map``, ``set``), so a list
    of thousands of records costs a few Python steps per level, not per record.
    """
    while True:
        values = list(chain.from_iterable(level))
        kinds = set(map(type, values))
        if kinds <= _SCALARS:
            return True
        if depth > MAX_DEPTH or not kinds <= _ALLOWED_TYPES:
            return False
        if dict in kinds:
            records = values if len(kinds) == 1 else [v for v in values if type(v) is dict]
            if not _KEY_TYPES.issuperset(map(type, chain.from_iterable(records))):
                return False
            level = list(map(dict.values, records))
            if list in kinds or tuple in kinds:
                level += [v for v in values if type(v) is list or type(v) is tuple]
        elif kinds <= _SEQUENCE_TYPES:
            level = values
        else:
            level = [v for v in values if type(v) is list or type(v) is tuple]
        depth += 1


def _describe(
    args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any], *, for_unpack: bool
) -> Exception:
    """The error for the first value in ``args`` then ``kwargs`` that may not travel."""
    for index, item in enumerate(args):
        found = _find(item, f"args[{index}]", 1)
        if found is not None:
            break
    else:
        for key, item in kwargs.items():
            found = _find(item, f"kwargs[{_key(key)}]", 1)
            if found is not None:
                break
        else:  # pragma: no cover - _fit and _find disagree: a bug in this module
            return TypeError("cannot serialize the arguments: pmq sends arguments as msgpack")
    error_type, path, what, hint = found
    if error_type is ValueError and len(path) > 120:  # a path 65 levels deep; show its ends
        path = f"{path[:60]}...{path[-40:]}"
    if for_unpack:
        return error_type(f"{path} is {what}")
    return error_type(f"cannot serialize {path} ({what}): pmq sends arguments as msgpack; {hint}")


def _find(value: Any, path: str, depth: int) -> tuple[type[Exception], str, str, str] | None:
    """The first value inside ``value`` that may not travel, as (error type, path, what, hint).

    The slow check, run only after the fast one failed: it walks in order and builds paths.
    """
    kind = type(value)
    if kind in _SCALARS:
        if kind is int and not _INT_MIN <= value <= _INT_MAX:
            what = f"an int of {value.bit_length()} bits, outside msgpack's -2**63 .. 2**64-1"
            return TypeError, path, what, "pass it as a str"
        return None
    if kind is list or kind is tuple or kind is dict:
        if depth > MAX_DEPTH:
            what = f"nested more than {MAX_DEPTH} containers deep"
            return ValueError, path, what, "flatten it, or look for a reference cycle"
        if kind is dict:
            for key, item in value.items():
                if type(key) not in _KEY_TYPES:
                    what = f"a dict with the key {key!r:.60}, {_a(type(key))}"
                    return TypeError, path, what, "dict keys must be str or bytes; use str(key)"
                found = _find(item, f"{path}[{_key(key)}]", depth + 1)
                if found is not None:
                    return found
        else:
            for index, item in enumerate(value):
                found = _find(item, f"{path}[{index}]", depth + 1)
                if found is not None:
                    return found
        return None
    return TypeError, path, _a(kind), _hint(value)


def _hint(value: object) -> str:
    """What to pass instead of ``value``, which msgpack cannot carry."""
    import datetime  # already imported by almost every program; only needed for messages

    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return "pass an ISO string or a timestamp"
    if isinstance(value, datetime.timedelta):
        return "pass a number of seconds (value.total_seconds())"
    if isinstance(value, msgpack.ExtType | msgpack.Timestamp):  # ExtType is a namedtuple
        return "pmq does not send msgpack extension types"
    if isinstance(value, enum.Enum):
        return "pass its .value (an enum member would arrive as its plain value)"
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return "pass value._asdict() or tuple(value) (a namedtuple would arrive as a plain list)"
    if isinstance(value, set | frozenset):
        return "pass a list, e.g. sorted(value)"
    if isinstance(value, bytearray | memoryview):
        return "pass bytes(value)"
    if dataclasses.is_dataclass(value):
        return "pass dataclasses.asdict(value)"
    if isinstance(value, os.PathLike):
        return "pass str(value)"
    for base in (bool, int, float, str, bytes, list, tuple, dict):
        if isinstance(value, base):
            return (
                f"it is a subclass of {base.__name__}, which would arrive as a plain "
                f"{base.__name__}; pass {base.__name__}(value)"
            )
    if type(value).__module__ in {"decimal", "fractions", "uuid", "ipaddress"}:
        return "pass str(value)"
    return f"convert it to {_ALLOWED} (pmq never pickles)"


def _a(kind: type) -> str:
    """``"a datetime.datetime"``, ``"an int"``: a type's name with its article."""
    name = kind.__qualname__
    if kind.__module__ not in {"builtins", "__main__"}:
        name = f"{kind.__module__}.{name}"
    return f"{'an' if name[0].lower() in 'aeio' else 'a'} {name}"  # "a uuid.UUID", "a UserDict"


def _key(key: str | bytes) -> str:
    """A dict key as written in a path: ``'when'``; a key over 30 characters is shortened."""
    return repr(key) if len(key) <= 30 else f"{key[:30]!r}..."


def _summary(value: object) -> str:
    if type(value) is list:
        kinds = ", ".join(type(item).__name__ for item in value[:4])
        return f"a list of {len(value)} ({kinds}{', ...' if len(value) > 4 else ''})"
    return _a(type(value))
