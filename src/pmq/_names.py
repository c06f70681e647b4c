"""The naming rules of pmq: cage names, queue targets, module and method names, call ids.

Owns: the one definition of every name rule in DESIGN.md §1 ("Names"), and the parsing of a
target as written in ``execute.on(target)``. Must not: import anything but the standard library
(every layer may validate names), know what a cage or a queue does, or look anything up.

Invariants:
- Each function returns the name it was given, unchanged, or raises: ``TypeError`` when it is not
  a ``str``, ``ValueError`` when it breaks the rule. The message quotes the bad value (shortened
  if long) and states the rule, so the caller never has to guess which rule it broke.
- The rules are ASCII-only: a name means the same bytes on every cage, in every log line and on
  every file system, with no Unicode normalisation or look-alike characters involved.
- ``loopback`` is reserved: ``"loopback_queue"`` always means the calling cage itself, so no cage
  may be named ``loopback`` (a peer of that name could never be reached by a queued call).
- ``pmq`` is reserved as a module name (``RESERVED_MODULE``): every cage answers the synchronous
  call ``pmq.status`` itself (``pmq status --connect``), so no cage may expose a module of that
  name. It stays a valid identifier (``check_identifier``): the wire carries it.
"""

from __future__ import annotations

import keyword
import re

__all__ = [
    "LOOPBACK",
    "MAX_CAGE_NAME_CHARS",
    "MAX_CALL_ID_CHARS",
    "MAX_IDENTIFIER_CHARS",
    "QUEUE_SUFFIX",
    "RESERVED_MODULE",
    "check_cage_name",
    "check_call_id",
    "check_identifier",
    "check_module_name",
    "parse_target",
]

#: The suffix that makes a target a queued call: ``"ledger_queue"``.
QUEUE_SUFFIX = "_queue"
#: The target name of the calling cage itself, as in ``"loopback_queue"``.
LOOPBACK = "loopback"
#: The module of pmq's own methods, which every cage answers itself (``pmq.status``).
RESERVED_MODULE = "pmq"
MAX_CAGE_NAME_CHARS = 32
#: Module and method names; far above any real name, low enough to keep frames and logs sane.
MAX_IDENTIFIER_CHARS = 128
MAX_CALL_ID_CHARS = 200

_CAGE_NAME = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_CAGE_NAME_CHARS}}}")
_IDENTIFIER = re.compile(rf"[A-Za-z][A-Za-z0-9_]{{0,{MAX_IDENTIFIER_CHARS - 1}}}")

_CAGE_RULE = (
    f"a cage name is 1 to {MAX_CAGE_NAME_CHARS} of A-Z a-z 0-9 _ - "
    f"and does not end in {QUEUE_SUFFIX!r}"
)
_TARGET_RULE = (
    f"a target is '<cage>{QUEUE_SUFFIX}' for a queued call, 'loopback{QUEUE_SUFFIX}' for a queued "
    f"call to this cage, or '<cage>' for a synchronous call; {_CAGE_RULE}"
)


def _shown(value: str, limit: int = 60) -> str:
    """``repr(value)``, shortened to about ``limit`` characters for error messages."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def _require_str(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__} ({value!r:.60})")
    return value


def _cage_name_problem(name: str) -> str | None:
    """What is wrong with ``name`` as a cage name (``loopback`` aside), or None if nothing is."""
    if _CAGE_NAME.fullmatch(name) is not None:
        if name.endswith(QUEUE_SUFFIX):
            return f"it ends in {QUEUE_SUFFIX!r}"
        return None
    if not name:
        return "it is empty"
    if len(name) > MAX_CAGE_NAME_CHARS:
        return f"it has {len(name)} characters, more than {MAX_CAGE_NAME_CHARS}"
    bad = next(c for c in name if _CAGE_NAME.fullmatch(c) is None)
    return f"character {bad!r} at index {name.index(bad)} is not allowed"


def check_cage_name(name: str) -> str:
    """Check that ``name`` can name a cage.

    Args:
        name: the proposed cage name, e.g. ``"billing"``.

    Returns:
        ``name``, unchanged.

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: ``name`` is empty, too long, has a character outside ``[A-Za-z0-9_-]``,
            ends in ``"_queue"`` or is the reserved ``"loopback"``.
    """
    _require_str("a cage name", name)
    problem = _cage_name_problem(name)
    if problem is not None:
        raise ValueError(f"invalid cage name {_shown(name)}: {problem}; {_CAGE_RULE}")
    if name == LOOPBACK:
        raise ValueError(
            f"invalid cage name {name!r}: it is reserved, because "
            f"'{LOOPBACK}{QUEUE_SUFFIX}' always means the calling cage itself"
        )
    return name


def check_identifier(kind: str, name: str) -> str:
    """Check that ``name`` can name an exposed module or method.

    Args:
        kind: what the name is for, used in the message: ``"module"`` or ``"method"``.
        name: the proposed name, e.g. ``"accounts"``.

    Returns:
        ``name``, unchanged.

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: ``name`` is not an ASCII Python identifier, is a keyword, starts with ``_``
            (private names are never callable through pmq) or is longer than
            ``MAX_IDENTIFIER_CHARS``.
    """
    _require_str(f"a {kind} name", name)
    if _IDENTIFIER.fullmatch(name) is not None and not keyword.iskeyword(name):
        return name
    rule = (
        f"a {kind} name is an ASCII Python identifier of at most {MAX_IDENTIFIER_CHARS} "
        f"characters that is not a keyword and does not start with '_'"
    )
    if name.startswith("_"):
        raise ValueError(
            f"invalid {kind} name {_shown(name)}: names starting with '_' are private and never "
            f"callable through pmq; {rule}"
        )
    if keyword.iskeyword(name):
        raise ValueError(f"invalid {kind} name {name!r}: it is a Python keyword; {rule}")
    raise ValueError(f"invalid {kind} name {_shown(name)}: {rule}")


def check_module_name(name: str) -> str:
    """Check that ``name`` can name a module a cage exposes (``cage.expose(name, obj)``).

    Args:
        name: the proposed module name, e.g. ``"accounts"``.

    Returns:
        ``name``, unchanged.

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: ``name`` breaks the rule of ``check_identifier``, or is the reserved
            ``"pmq"`` (``RESERVED_MODULE``), the module of pmq's own methods.
    """
    check_identifier("module", name)
    if name == RESERVED_MODULE:
        raise ValueError(
            f"invalid module name {name!r}: it is reserved for pmq's own methods "
            f"({RESERVED_MODULE}.status answers `pmq status --connect`); expose it under "
            f"another name"
        )
    return name


def parse_target(name: str) -> tuple[str, bool]:
    """Split a target as written in ``execute.on(name)`` into a cage name and the call's kind.

    ``"ledger_queue"`` is a queued call to cage ``ledger``, ``"loopback_queue"`` a queued call to
    the calling cage, and ``"ledger"`` a synchronous call to cage ``ledger``. A plain
    ``"loopback"`` is accepted too (a synchronous call to the calling cage); whether the cage
    supports that is the cage's business.

    Args:
        name: the target.

    Returns:
        ``(cage, queued)``: the cage name (``"loopback"`` for the calling cage) and whether the
        call is queued.

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: ``name`` is neither form, e.g. ``"_queue"``, ``"a b_queue"`` or
            ``"x_queue_queue"``.
    """
    _require_str("a target", name)
    if name.endswith(QUEUE_SUFFIX):
        cage, queued = name[: -len(QUEUE_SUFFIX)], True
    else:
        cage, queued = name, False
    if cage == LOOPBACK:
        return cage, queued
    problem = _cage_name_problem(cage)
    if problem is not None:
        if queued:
            problem = f"the cage name {_shown(cage)} before {QUEUE_SUFFIX!r} is bad ({problem})"
        raise ValueError(f"invalid target {_shown(name)}: {problem}; {_TARGET_RULE}")
    return cage, queued


def check_call_id(user_id: str) -> str:
    """Check a call id given by the user (``execute.on(..., id="transfer/123")``).

    Any printable text will do: the id is only compared, never parsed (pmq itself adds
    ``"<parent id>:"`` in front of ids given inside a handler).

    Args:
        user_id: the proposed id.

    Returns:
        ``user_id``, unchanged.

    Raises:
        TypeError: ``user_id`` is not a str.
        ValueError: ``user_id`` is empty, longer than ``MAX_CALL_ID_CHARS`` characters or holds a
            character that is not printable (control characters, line breaks, lone surrogates).
    """
    _require_str("a call id", user_id)
    if not user_id:
        raise ValueError(
            f"invalid call id '': a call id is 1 to {MAX_CALL_ID_CHARS} printable characters"
        )
    if len(user_id) > MAX_CALL_ID_CHARS:
        raise ValueError(
            f"invalid call id {_shown(user_id)}: it has {len(user_id)} characters, "
            f"at most {MAX_CALL_ID_CHARS} are allowed"
        )
    if not user_id.isprintable():
        bad = next(c for c in user_id if not c.isprintable())
        raise ValueError(
            f"invalid call id {_shown(user_id)}: character {bad!r} at index {user_id.index(bad)} "
            f"is not printable; a call id is 1 to {MAX_CALL_ID_CHARS} printable characters"
        )
    return user_id
