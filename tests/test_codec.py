"""Call arguments as msgpack (pmq._codec): what may travel, errors that say where, safe decoding.

What must hold (the module docstring of pmq._codec):
- every value built from the allowed types round-trips exactly (tuples come back as lists), types
  included: ``True`` never comes back as ``1``, nor ``b"x"`` as ``"x"``;
- a value that may not travel raises ``TypeError`` (``ValueError`` when nested too deep) naming its
  exact path, e.g. ``kwargs['when']`` or ``args[1][0]['x']``, however deep it sits;
- ``unpack_arguments`` accepts exactly what ``pack_arguments`` makes, and anything else (truncated,
  malformed, oversized, hostile) raises ``ValueError``, never another exception.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import math
import pathlib
import threading
import types
import uuid
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pmq._codec import MAX_DEPTH, pack_arguments, unpack_arguments

INT_MIN = -(2**63)
INT_MAX = 2**64 - 1

scalars = (
    st.none()
    | st.booleans()
    | st.integers(INT_MIN, INT_MAX)
    | st.floats()
    | st.text()
    | st.binary()
)
keys = st.text(max_size=8) | st.binary(max_size=8)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.lists(children, max_size=5).map(tuple)
        | st.dictionaries(keys, children, max_size=5)
    ),
    max_leaves=40,
)
arguments = st.lists(values, max_size=5).map(tuple)
#: Containers of 16 or more items are checked breadth first (pmq._codec._fit_level).
big_values = st.lists(values, min_size=16, max_size=40) | st.lists(
    st.dictionaries(keys, values, max_size=4), min_size=16, max_size=40
)
keyword_arguments = st.dictionaries(st.text(max_size=10), values, max_size=5)


def as_sent(value: Any) -> Any:
    """What ``value`` should come back as: tuples become lists, all else stays."""
    if isinstance(value, list | tuple):
        return [as_sent(item) for item in value]
    if isinstance(value, dict):
        return {key: as_sent(item) for key, item in value.items()}
    return value


def assert_same(got: Any, expected: Any) -> None:
    """Equal value for value *and* type (``1 == True`` and ``0.0 == 0`` would hide bugs)."""
    assert type(got) is type(expected), (got, expected)
    if isinstance(expected, list):
        assert len(got) == len(expected)
        for got_item, expected_item in zip(got, expected, strict=True):
            assert_same(got_item, expected_item)
    elif isinstance(expected, dict):
        assert list(got) == list(expected)
        for key in expected:
            assert_same(got[key], expected[key])
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == expected


def nested(depth: int, leaf: Any = 1) -> Any:
    """``[[...[leaf]...]]``: ``depth`` lists around ``leaf``."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


class Color(enum.IntEnum):
    RED = 1


@dataclasses.dataclass
class Point:
    x: int


Pair = collections.namedtuple("Pair", "a b")


# ---- round trips ------------------------------------------------------------------------------


def test_simple_call_round_trips() -> None:
    """Positional and keyword arguments come back with their types; a tuple as a list."""
    data = pack_arguments((42, (1, "two"), {"k": b"\x00"}), {"amount": 10.5, "memo": None})
    args, kwargs = unpack_arguments(data)
    assert_same(args, [42, [1, "two"], {"k": b"\x00"}])
    assert_same(kwargs, {"amount": 10.5, "memo": None})


def test_no_arguments_round_trip() -> None:
    """A call without arguments is an empty list and an empty dict."""
    assert unpack_arguments(pack_arguments((), {})) == ([], {})


@given(arguments, keyword_arguments)
def test_allowed_values_round_trip_exactly(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Any nesting of allowed values comes back equal in value and type, tuples as lists."""
    got_args, got_kwargs = unpack_arguments(pack_arguments(args, kwargs))
    assert_same(got_args, as_sent(list(args)))
    assert_same(got_kwargs, as_sent(kwargs))


@given(big_values, keyword_arguments)
def test_big_containers_round_trip_exactly(value: list[Any], kwargs: dict[str, Any]) -> None:
    """Long lists, of records or of anything, come back equal in value and type."""
    got_args, got_kwargs = unpack_arguments(pack_arguments((value, [value]), kwargs))
    assert_same(got_args, as_sent([value, [value]]))
    assert_same(got_kwargs, as_sent(kwargs))


@pytest.mark.parametrize("number", [INT_MIN, -1, 0, 2**63 - 1, 2**63, INT_MAX])
def test_ints_at_the_edges_of_the_range_round_trip(number: int) -> None:
    """Every int msgpack can carry, from -2**63 to 2**64-1, travels."""
    assert_same(unpack_arguments(pack_arguments((number,), {}))[0], [number])


@pytest.mark.parametrize("number", [math.inf, -math.inf, math.nan, -0.0, 5e-324])
def test_special_floats_round_trip(number: float) -> None:
    """Infinities, NaN, negative zero and subnormals travel as floats."""
    assert_same(unpack_arguments(pack_arguments((number,), {}))[0], [number])


def test_str_and_bytes_keys_stay_distinct() -> None:
    """A dict may use str and bytes keys; 'a' and b'a' remain two keys of their own types."""
    value = {"a": 1, b"a": 2}
    assert_same(unpack_arguments(pack_arguments((value,), {}))[0], [value])


def test_nesting_up_to_the_limit_travels() -> None:
    """An argument nested exactly MAX_DEPTH containers deep is accepted both ways."""
    value = nested(MAX_DEPTH)
    assert_same(unpack_arguments(pack_arguments((value,), {"k": value}))[0], [value])


def test_mapping_kwargs_are_accepted() -> None:
    """kwargs may be any mapping with str keys; it is sent as a dict."""
    proxy = types.MappingProxyType({"a": 1})
    assert unpack_arguments(pack_arguments([1], proxy)) == ([1], {"a": 1})


def test_packing_from_many_threads_gives_each_its_own_bytes() -> None:
    """Threads packing at once never see each other's buffers (one packer per thread)."""
    failures: list[str] = []

    def work(worker: int) -> None:
        for n in range(300):
            args = (worker, n, "x" * (n % 50), [worker] * (n % 7))
            if unpack_arguments(pack_arguments(args, {"n": n}))[0] != as_sent(list(args)):
                failures.append(f"worker {worker} call {n}")

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# ---- what may not travel, and where it is -----------------------------------------------------


def test_datetime_keyword_is_named_with_a_hint() -> None:
    """The message names kwargs['when'], its type and what to pass instead."""
    with pytest.raises(TypeError) as caught:
        pack_arguments((), {"when": datetime.datetime(2024, 1, 2)})
    assert str(caught.value) == (
        "cannot serialize kwargs['when'] (a datetime.datetime): pmq sends arguments as msgpack; "
        "pass an ISO string or a timestamp"
    )


def test_value_deep_inside_an_argument_is_named_by_its_path() -> None:
    """A bad value in a dict in a list in the second argument is args[1][0]['x']."""
    with pytest.raises(TypeError, match=r"^cannot serialize args\[1\]\[0\]\['x'\] \(an object\)"):
        pack_arguments((1, [{"y": 2, "x": object()}]), {})


@pytest.mark.parametrize(
    ("value", "what", "hint"),
    [
        (datetime.date(2024, 1, 2), "a datetime.date", "ISO string"),
        (datetime.timedelta(seconds=3), "a datetime.timedelta", "total_seconds()"),
        (decimal.Decimal("1.5"), "a decimal.Decimal", "str(value)"),
        (uuid.UUID(int=1), "a uuid.UUID", "str(value)"),
        (pathlib.PurePosixPath("/tmp"), "a pathlib.PurePosixPath", "str(value)"),
        ({1, 2}, "a set", "pass a list"),
        (frozenset(), "a frozenset", "pass a list"),
        (bytearray(b"x"), "a bytearray", "bytes(value)"),
        (memoryview(b"x"), "a memoryview", "bytes(value)"),
        (Color.RED, "a test_codec.Color", ".value"),
        (Pair(1, 2), "a test_codec.Pair", "_asdict()"),
        (Point(1), "a test_codec.Point", "dataclasses.asdict"),
        (collections.OrderedDict(a=1), "a collections.OrderedDict", "subclass of dict"),
        (collections.defaultdict(list), "a collections.defaultdict", "subclass of dict"),
        (type("Text", (str,), {})("x"), "a test_codec.Text", "subclass of str"),
        (msgpack.ExtType(5, b"x"), "a msgpack.ext.ExtType", "extension types"),
        (msgpack.Timestamp(1, 0), "a msgpack.ext.Timestamp", "extension types"),
        (3 + 4j, "a complex", "pmq never pickles"),
        (print, "a builtin_function_or_method", "pmq never pickles"),
        (2**64, "an int of 65 bits", "pass it as a str"),
        (INT_MIN - 1, "an int of 64 bits", "pass it as a str"),
        ({1: "one"}, "a dict with the key 1, an int", "keys must be str or bytes"),
        ({None: 1}, "a dict with the key None, a NoneType", "keys must be str or bytes"),
        ({(1, 2): 1}, "a dict with the key (1, 2), a tuple", "keys must be str or bytes"),
        ({1.5: 1}, "a dict with the key 1.5, a float", "keys must be str or bytes"),
    ],
)
def test_each_kind_of_refused_value_gets_its_own_hint(value: Any, what: str, hint: str) -> None:
    """Every refused type is named, with a hint that fits it, at its path."""
    with pytest.raises(TypeError) as caught:
        pack_arguments(("ok", [value]), {})
    message = str(caught.value)
    assert message.startswith(f"cannot serialize args[1][0] ({what}")
    assert hint in message


def test_first_refused_value_in_call_order_is_named() -> None:
    """With several bad values, the first one (args before kwargs, in order) is reported."""
    with pytest.raises(TypeError, match=r"args\[2\]"):
        pack_arguments((1, 2, {3}, {4}), {"a": {5}})


def test_long_keys_are_shortened_in_paths() -> None:
    """A path shows at most 30 characters of a key, then '...'."""
    key = "k" * 31 + "\n"
    with pytest.raises(TypeError, match=r"^cannot serialize kwargs\['k{30}'\.\.\.\] \(a set\)"):
        pack_arguments((), {key: {1}})


def test_out_of_range_int_is_found_after_the_packer_refuses_it() -> None:
    """An int past 2**64-1 deep in a kwarg is named by its full path."""
    with pytest.raises(TypeError, match=r"^cannot serialize kwargs\['a'\]\['b'\]\[2\] \(an int"):
        pack_arguments((), {"a": {"b": [0, 1, 2**70]}})


bad_values = st.sampled_from(
    [
        datetime.datetime(2024, 1, 1),
        object(),
        {1, 2},
        decimal.Decimal(1),
        bytearray(b"x"),
        2**64,
        INT_MIN - 1,
        Color.RED,
        Pair(1, 2),
        msgpack.ExtType(1, b""),
    ]
)
steps = st.lists(
    st.tuples(st.just("list"), st.integers(0, 3) | st.integers(14, 20), st.booleans())
    | st.tuples(st.just("dict"), keys, st.booleans()),
    max_size=12,
)


@given(steps, bad_values, st.integers(0, 2), st.booleans())
def test_refused_value_at_any_depth_is_named_by_its_exact_path(
    route: list[tuple[str, Any, bool]], bad: Any, position: int, in_kwargs: bool
) -> None:
    """Wherever a refused value sits in valid surroundings, the message gives its exact path."""
    value, path = bad, ""
    for kind, step, as_tuple in reversed(route):
        if kind == "list":
            items = [0] * step + [value] + ["after"]
            value = tuple(items) if as_tuple else items
            path = f"[{step}]{path}"
        else:
            value = {"before": 1, step: value} if step != "before" else {step: value}
            path = f"[{step!r}]{path}"
    if in_kwargs:
        args: tuple[Any, ...] = (1,)
        kwargs = {"first": 2, "target": value}
        path = f"kwargs['target']{path}"
    else:
        args = (*["fine"] * position, value, "later")
        kwargs = {"first": 2}
        path = f"args[{position}]{path}"
    with pytest.raises(TypeError) as caught:
        pack_arguments(args, kwargs)
    assert str(caught.value).startswith(f"cannot serialize {path} (")


def test_nesting_past_the_limit_is_a_value_error_at_that_level() -> None:
    """One container more than MAX_DEPTH raises ValueError; the message says how deep is allowed."""
    with pytest.raises(ValueError, match=f"nested more than {MAX_DEPTH} containers deep"):
        pack_arguments((), {"deep": nested(MAX_DEPTH + 1)})


@pytest.mark.parametrize("count", [1, 20])
def test_depth_limit_holds_inside_long_lists_too(count: int) -> None:
    """The limit is the same whether a list is checked depth first or breadth first."""
    fits = [nested(MAX_DEPTH - 1)] * count
    assert_same(unpack_arguments(pack_arguments((fits,), {}))[0], [fits])
    with pytest.raises(ValueError, match=rf"^cannot serialize args\[0\]\[{count - 1}\]"):
        pack_arguments(([*fits[:-1], nested(MAX_DEPTH)],), {})


def test_bad_key_in_many_records_is_named() -> None:
    """Among 20 records, the one with an int key is named by its index."""
    records: list[dict[Any, Any]] = [{"id": n, "ok": [n]} for n in range(20)]
    records[17] = {"id": 17, 5: "five"}
    with pytest.raises(TypeError, match=r"^cannot serialize args\[0\]\[17\] \(a dict with"):
        pack_arguments((records,), {})


def test_reference_cycle_is_refused_without_recursing_forever() -> None:
    """A list that contains itself hits the depth limit; the message mentions a cycle."""
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="reference cycle") as caught:
        pack_arguments((cycle,), {})
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize("args", [None, "abc", {1: 2}, iter([1])])
def test_args_that_are_not_a_sequence_are_a_type_error(args: Any) -> None:
    """args must be a tuple or a list."""
    with pytest.raises(TypeError, match="args must be a tuple or a list"):
        pack_arguments(args, {})


def test_kwargs_that_are_not_a_mapping_are_a_type_error() -> None:
    """kwargs must be a mapping."""
    with pytest.raises(TypeError, match="kwargs must be a dict, not list"):
        pack_arguments((), [("a", 1)])  # type: ignore[arg-type]


def test_kwargs_with_a_non_str_key_are_a_type_error() -> None:
    """Keyword names must be str: bytes keys are fine inside values, not as keyword names."""
    with pytest.raises(TypeError, match="kwargs key b'a' is a bytes: keyword argument names"):
        pack_arguments((), {b"a": 1})  # type: ignore[dict-item]


# ---- decoding untrusted bytes -----------------------------------------------------------------


def packed_directly(value: Any) -> bytes:
    """Bytes made by msgpack itself, bypassing pack_arguments's checks (as a hostile peer would)."""
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


VALID = pack_arguments((1, [2, "three"], {"four": b"4"}), {"five": 5.0, "six": [None, True]})


@pytest.mark.parametrize("cut", range(len(VALID)))
def test_every_truncation_is_a_value_error(cut: int) -> None:
    """Each proper prefix of a valid encoding is refused as malformed."""
    with pytest.raises(ValueError, match=r"^malformed call arguments \("):
        unpack_arguments(VALID[:cut])


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "incomplete input"),
        (b"\xc1", "FormatError"),
        (VALID + b"\x00", "extra data"),
        (packed_directly(1), "expected [args list, kwargs map], got an int"),
        (packed_directly([[]]), "got a list of 1 (list)"),
        (packed_directly([[], [], []]), "got a list of 3"),
        (packed_directly([{}, {}]), "got a list of 2 (dict, dict)"),
        (packed_directly([[], []]), "got a list of 2 (list, list)"),
        (packed_directly([[], {b"name": 1}]), "keyword name b'name' is not a str"),
        (packed_directly([[{1: 2}], {}]), "int is not allowed for map key"),
        (packed_directly([[{None: 2}], {}]), "is not allowed for map key"),
        (b"\x92\x91\xa2\xff\xfe\x80", "can't decode byte 0xff"),
        (packed_directly([[msgpack.ExtType(7, b"x")], {}]), "extension type 7 is not allowed"),
        (packed_directly([[msgpack.Timestamp(5, 0)], {}]), "args[0] is a msgpack.ext.Timestamp"),
        (packed_directly([[], {"t": [msgpack.Timestamp(5, 9)]}]), "kwargs['t'][0] is a msgpack"),
        (b"\x92\xdd\xff\xff\xff\xff", "exceeds max_array_len"),
        (b"\x92\x90\xdf\xff\xff\xff\xff", "exceeds max_map_len"),
        (b"\x92\x91\xdb\xff\xff\xff\xff", "incomplete input"),
        (b"\x92\x91\xc6\xff\xff\xff\xff", "incomplete input"),
        (b"\x92\x91\xc9\xff\xff\xff\xff\x01", "max_ext_len"),
    ],
)
def test_malformed_or_hostile_input_is_a_value_error(data: bytes, fragment: str) -> None:
    """Each kind of bad input is refused with ValueError saying what was wrong."""
    with pytest.raises(ValueError, match=r"^malformed call arguments \(") as caught:
        unpack_arguments(data)
    assert fragment in str(caught.value)


def test_nesting_past_the_limit_is_refused_when_decoding() -> None:
    """Bytes nesting deeper than pack_arguments allows are refused, naming where."""
    data = packed_directly([[nested(MAX_DEPTH + 1)], {}])
    with pytest.raises(ValueError, match=f"nested more than {MAX_DEPTH} containers deep"):
        unpack_arguments(data)


def test_nesting_past_the_limit_inside_a_long_list_is_refused_when_decoding() -> None:
    """The decoder's depth check also covers containers checked breadth first."""
    data = packed_directly([[[nested(MAX_DEPTH - 1)] * 19 + [nested(MAX_DEPTH)]], {}])
    with pytest.raises(ValueError, match=r"args\[0\]\[19\]\[0\]"):
        unpack_arguments(data)


def test_nesting_far_past_msgpack_stack_is_a_value_error() -> None:
    """Thousands of nested array headers end in ValueError, not a crash or RecursionError."""
    data = b"\x92" + b"\x91" * 5000 + b"\x90" + b"\x80"
    with pytest.raises(ValueError, match=r"^malformed call arguments"):
        unpack_arguments(data)


def test_bytes_like_input_is_accepted() -> None:
    """bytearray and memoryview are decoded like bytes."""
    expected = unpack_arguments(VALID)
    assert unpack_arguments(bytearray(VALID)) == expected
    assert unpack_arguments(memoryview(VALID)) == expected


def test_non_bytes_input_is_a_type_error() -> None:
    """Decoding a str is a caller's mistake: TypeError."""
    with pytest.raises(TypeError, match="data must be bytes, not str"):
        unpack_arguments("abc")  # type: ignore[arg-type]


@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_value_error(data: bytes) -> None:
    """Whatever the bytes, decoding returns [list, dict] or raises ValueError, nothing else."""
    try:
        args, kwargs = unpack_arguments(data)
    except ValueError:
        return
    assert type(args) is list
    assert type(kwargs) is dict


@given(arguments, keyword_arguments, st.data())
def test_corrupted_encodings_decode_or_raise_value_error(
    args: tuple[Any, ...], kwargs: dict[str, Any], data: st.DataObject
) -> None:
    """A valid encoding with one byte changed decodes to something or raises ValueError."""
    encoded = bytearray(pack_arguments(args, kwargs))
    index = data.draw(st.integers(0, len(encoded) - 1))
    encoded[index] = data.draw(st.integers(0, 255))
    try:
        unpack_arguments(bytes(encoded))
    except ValueError:
        pass
