"""The call chain users write: ``execute.on(target, ...).module.method(*args, **kwargs)``.

Owns: turning that chain of attribute lookups into one ``submit(method_ref, args, kwargs)``, and
checking everything the chain says (target, id, deadline, timeout, names) before anything is
submitted. Must not: import anything of pmq's but ``_names``; serialize, store, send
or run anything (``submit``, given by the cage, does all that); hold state beyond the chain's own
fields.

Invariants:
- Every option is checked in ``on()``, every name in the lookup that introduces it, so a bad call
  fails in the line that wrote it, with ``ValueError``/``TypeError``, and ``submit`` only ever
  sees valid calls.
- Names starting with ``_`` raise ``AttributeError``: ``copy``, ``pickle``, ``hasattr(x,
  "__foo__")`` and debuggers probing for dunders get the answer they expect, and private
  names are never callable through pmq. No class here has a public attribute or method that
  could shadow a user's module or method name.
- ``args`` and ``kwargs`` reach ``submit`` exactly as the caller passed them (the same objects).
- Cheap: a plain ``on(target)`` and each module and method found are remembered (in a dict, and
  as instance attributes that never reach ``__getattr__`` again), and a call builds no object
  but its args tuple and kwargs dict: about 0.4 µs for the whole chain on a slow 2-core machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from pmq._names import check_call_id, check_identifier, parse_target

__all__ = ["MethodRef", "ModuleRef", "Proxy", "Submit", "Target"]

T = TypeVar("T")

#: What a proxy hands each call to: ``submit(spec, args, kwargs)``, where ``spec`` is the
#: ``MethodRef`` the user called and ``args``/``kwargs`` are exactly what they passed.
Submit = Callable[["MethodRef[T]", tuple[Any, ...], dict[str, Any]], T]

#: Names and targets checked once are remembered, up to this many of each (they are few).
_MAX_REMEMBERED_NAMES = 4096
_valid_names: set[str] = set()
_parsed_targets: dict[str, tuple[str, bool]] = {}


def _seconds(option: str, value: object) -> float | None:
    """``value`` as a positive, finite number of seconds, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{option}= must be a number of seconds, not {type(value).__name__} ({value!r:.40})"
        )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{option}= must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def _check_name(kind: str, name: str) -> None:
    if name not in _valid_names:
        check_identifier(kind, name)
        if len(_valid_names) < _MAX_REMEMBERED_NAMES:
            _valid_names.add(name)


class Proxy(Generic[T]):
    """The ``execute`` object: ``proxy.on(target, ...)`` starts a call.

    Args:
        submit: called as ``submit(method_ref, args, kwargs)`` for each call; what it returns
            (a call id, a result, an awaitable) is what the user's call returns.
        queued_only: refuse synchronous targets (for transactions, which hold queued calls).
    """

    __slots__ = ("_plain", "_queued_only", "_submit")

    def __init__(self, submit: Submit[T], *, queued_only: bool = False) -> None:
        self._submit = submit
        self._queued_only = queued_only
        self._plain: dict[str, Target[T]] = {}  # on(target) with no options, the common case

    def on(
        self,
        target: str,
        *,
        id: str | None = None,
        expires_in: float | None = None,
        timeout: float | None = None,
        wait: bool = False,
    ) -> Target[T]:
        """Choose where the call goes and how; then name its module and method.

        Args:
            target: ``"<cage>_queue"`` (queued), ``"loopback_queue"`` (queued, to this cage) or
                ``"<cage>"`` (synchronous).
            id: queued calls only: the caller's id; a target accepts one call per id from a
                given source cage within the retention window. Reusing the returned object for
                several calls reuses the id too.
            expires_in: queued calls only: seconds after which the call is moved to dead letters
                if it has not succeeded.
            timeout: synchronous calls only: seconds to wait for the result.
            wait: queued calls only: wait for room instead of raising ``QueueFull``.

        Returns:
            An object whose attributes are the target's modules.

        Raises:
            TypeError: an option has the wrong type.
            ValueError: an invalid target or id, a non-positive or non-finite number, an option
                that does not fit the kind of call, or a synchronous target where only queued
                calls may be made.
        """
        if id is None and expires_in is None and timeout is None and wait is False:
            plain = self._plain.get(target)
            if plain is not None:
                return plain
        parsed = _parsed_targets.get(target) if type(target) is str else None
        if parsed is None:
            parsed = parse_target(target)
            if len(_parsed_targets) < _MAX_REMEMBERED_NAMES:
                _parsed_targets[target] = parsed
        cage, queued = parsed
        if id is not None:
            check_call_id(id)
        seconds_to_expiry = _seconds("expires_in", expires_in)
        seconds_to_wait = _seconds("timeout", timeout)
        if type(wait) is not bool:
            raise TypeError(f"wait= must be True or False, not {type(wait).__name__}")
        if queued:
            if seconds_to_wait is not None:
                raise ValueError(
                    f"timeout= is for synchronous calls, and {target!r} is a queued call "
                    f"(returns once stored); give it a deadline with expires_in= instead"
                )
        else:
            if self._queued_only:
                raise ValueError(
                    f"{target!r} is a synchronous call, and only queued calls can be made here; "
                    f"did you mean '{target}_queue'?"
                )
            for option, value in (("id", id), ("expires_in", expires_in)):
                if value is not None:
                    raise ValueError(
                        f"{option}= is for queued calls, and {target!r} is a synchronous call; "
                        f"use timeout= to bound it, or call '{target}_queue'"
                    )
            if wait:
                raise ValueError(
                    f"wait= is for queued calls; a synchronous call to {target!r} always waits "
                    f"for its result"
                )
        made = Target(
            self._submit, target, cage, queued, id, seconds_to_expiry, seconds_to_wait, wait
        )
        if made._plain and len(self._plain) < _MAX_REMEMBERED_NAMES:
            self._plain[target] = made
        return made

    def __repr__(self) -> str:
        only = " (queued calls only)" if self._queued_only else ""
        return f"<pmq proxy{only}: .on(target).module.method(...)>"


class Target(Generic[T]):
    """``proxy.on(target)``: its attributes are the target cage's modules."""

    # No __slots__: a module found once is stored in the instance's __dict__, so later lookups
    # of it are plain attribute hits that never reach __getattr__ (module names never start
    # with "_", so they cannot shadow this class's own attributes).

    def __init__(
        self,
        submit: Submit[T],
        name: str,
        cage: str,
        queued: bool,
        user_id: str | None,
        expires_in: float | None,
        timeout: float | None,
        wait: bool,
    ) -> None:
        self._submit = submit
        self._name = name
        self._cage = cage
        self._queued = queued
        self._user_id = user_id
        self._expires_in = expires_in
        self._timeout = timeout
        self._wait = wait
        self._plain = user_id is None and expires_in is None and timeout is None and not wait
        self._remembered = 0

    def __getattr__(self, module: str) -> ModuleRef[T]:
        if module.startswith("_"):  # first: copy and pickle probe objects made without __init__
            raise AttributeError(module)
        _check_name("module", module)
        found = ModuleRef(self, module)
        if self._remembered < _MAX_REMEMBERED_NAMES:
            self._remembered += 1
            setattr(self, module, found)
        return found

    def __repr__(self) -> str:
        options = [
            f"{option}={value!r}"
            for option, value in (
                ("id", self._user_id),
                ("expires_in", self._expires_in),
                ("timeout", self._timeout),
            )
            if value is not None
        ]
        if self._wait:
            options.append("wait=True")
        kind = "queued" if self._queued else "synchronous"
        return f"<pmq target {self._name!r} ({', '.join([kind, *options])})>"


class ModuleRef(Generic[T]):
    """``proxy.on(target).module``: its attributes are the module's methods."""

    # No __slots__, for the reason given in Target.

    def __init__(self, target: Target[T], module: str) -> None:
        self._target = target
        self._module = module
        self._remembered = 0

    def __getattr__(self, method: str) -> MethodRef[T]:
        if method.startswith("_"):  # first: copy and pickle probe objects made without __init__
            raise AttributeError(method)
        _check_name("method", method)
        found = MethodRef(self._target, self._module, method)
        if self._remembered < _MAX_REMEMBERED_NAMES:
            self._remembered += 1
            setattr(self, method, found)
        return found

    def __repr__(self) -> str:
        return f"<pmq module {self._module!r} on {self._target._name!r}>"


class MethodRef(Generic[T]):
    """``proxy.on(target).module.method``: call it to make the call.

    It is also what ``submit`` receives with the arguments, so making a call builds no object
    but the args tuple and kwargs dict (a spec object per call cost a third of the chain's
    time). Its attributes are the call as the user wrote it:

    Attributes:
        target: the cage to call (``"loopback"`` for the calling cage itself).
        queued: True for a queued call (``"<cage>_queue"``), False for a synchronous one.
        module: the exposed module's name.
        method: the method's name.
        user_id: the caller's id for the call (``id=``), or None.
        expires_in: seconds from now after which a queued call is dead (``expires_in=``), or None.
        timeout: seconds a synchronous call may take (``timeout=``), or None for the default.
        wait: for a queued call, wait for room instead of raising ``QueueFull`` (``wait=``).
    """

    __slots__ = (
        "_name",
        "_submit",
        "expires_in",
        "method",
        "module",
        "queued",
        "target",
        "timeout",
        "user_id",
        "wait",
    )

    def __init__(self, target: Target[T], module: str, method: str) -> None:
        self._submit = target._submit
        self._name = target._name
        self.target = target._cage
        self.queued = target._queued
        self.module = module
        self.method = method
        self.user_id = target._user_id
        self.expires_in = target._expires_in
        self.timeout = target._timeout
        self.wait = target._wait

    def __call__(self, *args: Any, **kwargs: Any) -> T:
        return self._submit(self, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        raise AttributeError(
            f"{self!r} is a method: pmq calls are target.module.method(...), "
            f"so '{self.module}.{self.method}.{name}' names nothing"
        )

    def __repr__(self) -> str:
        return f"<pmq method '{self.module}.{self.method}' on {self._name!r}>"
