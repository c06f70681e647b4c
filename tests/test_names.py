"""The naming rules (DESIGN.md §1 "Names"): cage names, targets, module/method names, call ids.

Runs against the installed ``pmq._names``. Every rejected name must raise ``ValueError`` (or
``TypeError`` for a non-str) whose message quotes the bad value and states the rule it broke.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pmq._names import (
    MAX_CAGE_NAME_CHARS,
    MAX_CALL_ID_CHARS,
    MAX_IDENTIFIER_CHARS,
    RESERVED_MODULE,
    check_cage_name,
    check_call_id,
    check_identifier,
    check_module_name,
    parse_target,
)

cage_names = st.from_regex(r"\A[A-Za-z0-9_-]{1,32}\Z").filter(
    lambda name: not name.endswith("_queue") and name != "loopback"
)


# ---- cage names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a", "billing", "Ledger-2", "a_b-c", "9", "x" * MAX_CAGE_NAME_CHARS, "queue", "_queue1"],
)
def test_valid_cage_name_is_returned_unchanged(name: str) -> None:
    """A name of 1 to 32 allowed characters that does not end in _queue is accepted as is."""
    assert check_cage_name(name) is name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "it is empty"),
        ("x" * (MAX_CAGE_NAME_CHARS + 1), "33 characters"),
        ("a b", "character ' ' at index 1"),
        ("a.b", "character '.' at index 1"),
        ("caf\u00e9", "character '\u00e9' at index 3"),
        ("a\n", "character '\\n' at index 1"),
        ("ledger_queue", "ends in '_queue'"),
        ("_queue", "ends in '_queue'"),
        ("loopback", "reserved"),
    ],
)
def test_invalid_cage_name_names_value_and_rule(name: str, fragment: str) -> None:
    """Each broken rule is named in the message, together with the value."""
    with pytest.raises(ValueError, match="invalid cage name") as caught:
        check_cage_name(name)
    message = str(caught.value)
    assert fragment in message
    assert repr(name)[:20] in message


@pytest.mark.parametrize("name", [42, None, b"billing", ["billing"]])
def test_cage_name_of_wrong_type_is_a_type_error(name: object) -> None:
    """A cage name that is not a str raises TypeError naming its type."""
    with pytest.raises(TypeError, match=f"cage name must be a str, not {type(name).__name__}"):
        check_cage_name(name)  # type: ignore[arg-type]


def test_long_invalid_name_is_shortened_in_the_message() -> None:
    """A very long bad value is cut in the message, which still says how long it was."""
    with pytest.raises(ValueError) as caught:
        check_cage_name("x" * 10_000)
    assert len(str(caught.value)) < 400
    assert "10000 characters" in str(caught.value)


@given(cage_names)
def test_every_name_matching_the_rule_is_a_cage_name(name: str) -> None:
    """Any string of the documented alphabet and length is accepted."""
    assert check_cage_name(name) == name


# ---- module and method names ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["accounts", "credit2", "A", "snake_case_name", "match", "case", "type",
             "x" * MAX_IDENTIFIER_CHARS],
)  # fmt: skip
def test_valid_identifier_is_returned_unchanged(name: str) -> None:
    """ASCII identifiers, soft keywords included, are accepted as they are."""
    assert check_identifier("method", name) is name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("_private", "private"),
        ("__init__", "private"),
        ("_", "private"),
        ("class", "keyword"),
        ("None", "keyword"),
        ("async", "keyword"),
        ("1abc", "ASCII Python identifier"),
        ("a-b", "ASCII Python identifier"),
        ("a.b", "ASCII Python identifier"),
        ("", "ASCII Python identifier"),
        ("caf\u00e9", "ASCII Python identifier"),
        ("x" * (MAX_IDENTIFIER_CHARS + 1), "at most 128 characters"),
    ],
)
def test_invalid_identifier_names_kind_value_and_rule(name: str, fragment: str) -> None:
    """The message says whether it was a module or a method name, the value and the rule."""
    with pytest.raises(ValueError) as caught:
        check_identifier("module", name)
    message = str(caught.value)
    assert message.startswith("invalid module name ")
    assert fragment in message
    assert repr(name)[:20] in message


def test_identifier_of_wrong_type_is_a_type_error() -> None:
    """A module name that is not a str raises TypeError naming the kind and the type."""
    with pytest.raises(TypeError, match="a method name must be a str, not int"):
        check_identifier("method", 3)  # type: ignore[arg-type]


def test_pmq_is_a_valid_identifier_but_no_module_a_cage_may_expose() -> None:
    """``pmq`` passes ``check_identifier`` (the wire carries pmq.status) but not
    ``check_module_name``; other module names pass both, and bad ones fail both alike."""
    assert RESERVED_MODULE == "pmq"
    assert check_identifier("module", "pmq") == "pmq"
    with pytest.raises(ValueError, match=r"invalid module name 'pmq': it is reserved"):
        check_module_name("pmq")
    assert check_module_name("pmq2") == "pmq2"
    with pytest.raises(ValueError, match="start with '_'"):
        check_module_name("_pmq")
    with pytest.raises(TypeError):
        check_module_name(b"pmq")  # type: ignore[arg-type]


# ---- targets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("ledger_queue", ("ledger", True)),
        ("loopback_queue", ("loopback", True)),
        ("ledger", ("ledger", False)),
        ("loopback", ("loopback", False)),
        ("a-b_c_queue", ("a-b_c", True)),
        ("queue_queue", ("queue", True)),
        ("x" * MAX_CAGE_NAME_CHARS + "_queue", ("x" * MAX_CAGE_NAME_CHARS, True)),
    ],
)
def test_target_splits_into_cage_and_kind(target: str, expected: tuple[str, bool]) -> None:
    """'X_queue' is a queued call to X, 'X' a synchronous one, 'loopback' the cage itself."""
    assert parse_target(target) == expected


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("", "it is empty"),
        ("_queue", "the cage name '' before '_queue' is bad (it is empty)"),
        ("x_queue_queue", "the cage name 'x_queue' before '_queue' is bad (it ends in '_queue')"),
        ("loopback_queue_queue", "ends in '_queue'"),
        ("a b_queue", "character ' ' at index 1"),
        ("a b", "character ' ' at index 1"),
        ("ledger.queue", "character '.' at index 6"),
        ("x" * (MAX_CAGE_NAME_CHARS + 1) + "_queue", "33 characters"),
        ("x" * (MAX_CAGE_NAME_CHARS + 1), "33 characters"),
    ],
)
def test_invalid_target_names_value_and_the_two_forms(target: str, fragment: str) -> None:
    """A bad target's message quotes it, says what is wrong, and shows both valid forms."""
    with pytest.raises(ValueError) as caught:
        parse_target(target)
    message = str(caught.value)
    assert message.startswith(f"invalid target {repr(target)[:20]}")
    assert fragment in message
    assert "'<cage>_queue' for a queued call" in message


def test_target_of_wrong_type_is_a_type_error() -> None:
    """A target that is not a str raises TypeError."""
    with pytest.raises(TypeError, match="a target must be a str, not bytes"):
        parse_target(b"ledger_queue")  # type: ignore[arg-type]


@given(cage_names)
def test_queue_suffix_round_trips_every_cage_name(name: str) -> None:
    """For every valid cage name X, 'X_queue' parses back to X, queued, and 'X' to X, sync."""
    assert parse_target(f"{name}_queue") == (name, True)
    assert parse_target(name) == (name, False)


# ---- call ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "user_id",
    ["a", "transfer/123", "with spaces", "parent:step", "\u00fcml\u00e4ut \u2603",
     "x" * MAX_CALL_ID_CHARS],
)  # fmt: skip
def test_valid_call_id_is_returned_unchanged(user_id: str) -> None:
    """Any printable text of 1 to 200 characters is a call id."""
    assert check_call_id(user_id) is user_id


@pytest.mark.parametrize(
    ("user_id", "fragment"),
    [
        ("", "1 to 200 printable characters"),
        ("x" * (MAX_CALL_ID_CHARS + 1), "201 characters, at most 200"),
        ("a\nb", "character '\\n' at index 1 is not printable"),
        ("tab\there", "character '\\t' at index 3"),
        ("\x00", "character '\\x00' at index 0"),
        ("line\u2028sep", "index 4"),
        ("\ud800", "index 0"),
    ],
)
def test_invalid_call_id_names_the_problem(user_id: str, fragment: str) -> None:
    """Empty, too long, or holding a non-printable character: each is named precisely."""
    with pytest.raises(ValueError, match="invalid call id") as caught:
        check_call_id(user_id)
    assert fragment in str(caught.value)


@pytest.mark.parametrize("user_id", [123, b"bytes-id", None])
def test_call_id_of_wrong_type_is_a_type_error(user_id: object) -> None:
    """A call id that is not a str raises TypeError naming its type."""
    with pytest.raises(TypeError, match=f"a call id must be a str, not {type(user_id).__name__}"):
        check_call_id(user_id)  # type: ignore[arg-type]


@given(st.text(min_size=1, max_size=MAX_CALL_ID_CHARS).filter(str.isprintable))
def test_every_printable_text_within_the_limit_is_a_call_id(user_id: str) -> None:
    """The rule is exactly: printable and 1 to 200 characters."""
    assert check_call_id(user_id) == user_id
