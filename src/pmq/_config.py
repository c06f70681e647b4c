"""Configuration: per-queue policy, and a cage's keywords read from a TOML file.

Owns: ``QueuePolicy`` (the knobs of one queue: concurrency, order, retries, crash limit,
back-pressure limits) with its validation and backoff arithmetic; ``policies_from`` (the
``queues=`` keyword); ``load_config`` (a TOML file to ``Cage(**kwargs)`` keywords);
``parse_address``. Must not: import anything of pmq's but ``_names`` (nor any third-party module),
open anything but the configuration file, or start anything; how the cage uses each value is the
cage's business.

Invariants:
- A ``QueuePolicy`` that exists is valid: every field is checked when it is made, whichever way
  it is made (constructor, ``from_mapping``, ``dataclasses.replace``).
- Every error names what is wrong and where: the field or key, the value, the rule, and the
  file or table it came from (``queues.ledger_queue in /etc/pmq/ledger.toml: retry_max ...``).
  A value of the wrong type raises ``TypeError``; a value out of range, an unknown key or a
  missing one raises ``ValueError``.
- ``load_config`` returns only keywords that were in the file, already validated and converted
  (a relative ``data_dir`` resolved against the file's directory, ``secret`` as UTF-8 bytes,
  ``queues`` as ``QueuePolicy`` objects), so ``Cage(**load_config(path))`` fails only where the
  cage itself fails.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import random
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pmq._names import check_cage_name, check_module_name, parse_target

__all__ = [
    "DEFAULT_POLICY_NAME",
    "DURABILITY_MODES",
    "QueuePolicy",
    "load_config",
    "parse_address",
    "policies_from",
]

#: The key of ``queues=`` whose policy applies to every queue not listed by name.
DEFAULT_POLICY_NAME = "default"
DURABILITY_MODES = ("always", "interval", "never")

# Field -> (kind, lowest allowed, highest allowed); a kind of "int?" allows None.
_POLICY_RULES: dict[str, tuple[str, float, float]] = {
    "concurrency": ("int", 1, math.inf),
    "ordered": ("bool", 0, 0),
    "retry_initial": ("float", 0, math.inf),  # exclusive: 0 would retry in a busy loop
    "retry_max": ("float", 0, math.inf),  # also >= retry_initial
    "retry_multiplier": ("float", 1, math.inf),
    "retry_jitter": ("float", 0, 1),
    "max_attempts": ("int?", 1, math.inf),
    "max_crashes": ("int", 1, math.inf),
    "max_pending": ("int", 1, math.inf),
    "max_pending_bytes": ("int", 1, math.inf),
}


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """How one queue runs its calls, retries them and limits its backlog.

    Attributes:
        concurrency: how many calls of this queue may run at once.
        ordered: run calls one at a time, in the order they were accepted; a call that fails
            is retried before any later one runs, so a failing head blocks the queue (whatever
            ``concurrency`` says).
        retry_initial: seconds before the first retry (> 0).
        retry_max: the longest delay between two attempts, in seconds (>= ``retry_initial``).
        retry_multiplier: how much the delay grows after each failed attempt (>= 1).
        retry_jitter: the fraction of each delay that is randomised (0 to 1): a delay ``d``
            becomes a random value in ``(d * (1 - retry_jitter), d]``, so failed calls spread out
            instead of retrying in lockstep.
        max_attempts: attempts after which a call that keeps failing goes to dead letters; None
            retries until the call's deadline, if it has one, else for ever.
        max_crashes: attempts that crashed the process (recorded as started, never finished)
            after which the call is parked in dead letters and the queue moves on.
        max_pending: the most calls waiting on this cage's disk for the peer to accept them;
            over it, a queued call raises ``QueueFull``.
        max_pending_bytes: the same limit in bytes of stored calls.
    """

    concurrency: int = 512
    ordered: bool = False
    retry_initial: float = 1.0
    retry_max: float = 300.0
    retry_multiplier: float = 2.0
    retry_jitter: float = 0.5
    max_attempts: int | None = None
    max_crashes: int = 3
    max_pending: int = 1_000_000
    max_pending_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        values = {name: getattr(self, name) for name in _POLICY_RULES}
        problem = _policy_problem(values)
        if problem is not None:
            error_type, message = problem
            raise error_type(f"QueuePolicy: {message}")
        for name, (kind, _, _) in _POLICY_RULES.items():
            if kind == "float":  # an int is welcome; store what the field's type says
                object.__setattr__(self, name, float(values[name]))

    @classmethod
    def from_mapping(
        cls, d: Mapping[str, object], where: str, base: QueuePolicy | None = None
    ) -> QueuePolicy:
        """Make a policy from a mapping of field names, such as a table of a TOML file.

        Args:
            d: field name -> value; fields it leaves out come from ``base``.
            where: where the mapping came from, for messages, e.g.
                ``"queues.ledger_queue in cage.toml"``.
            base: the policy whose values fill in the fields ``d`` does not give; the
                defaults of ``QueuePolicy`` when None.

        Returns:
            The policy.

        Raises:
            TypeError: ``d`` is not a mapping, or a value has the wrong type.
            ValueError: a key is not a field of ``QueuePolicy``, or a value is out of range.
        """
        if not isinstance(d, Mapping):
            raise TypeError(
                f"{where}: a queue policy must be a table (a mapping), not {_kind_of(d)}"
            )
        for key in d:
            if key not in _POLICY_RULES:
                raise ValueError(f"{where}: {_unknown(key, _POLICY_RULES, 'queue policy key')}")
        values: dict[str, object] = {}
        if base is not None:
            values.update((name, getattr(base, name)) for name in _POLICY_RULES)
        values.update(d)
        problem = _policy_problem({**_DEFAULT_VALUES, **values})
        if problem is not None:
            error_type, message = problem
            raise error_type(f"{where}: {message}")
        return cls(**values)  # type: ignore[arg-type]  # checked just above

    def retry_delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after the failed attempt number ``attempt`` before the next one.

        ``retry_initial * retry_multiplier ** (attempt - 1)``, capped at ``retry_max``, then
        shortened by up to ``retry_jitter`` of itself at random.

        Args:
            attempt: the attempt that failed, counting from 1.
            rng: the source of jitter (seed it in tests).

        Returns:
            The delay, in ``(d * (1 - retry_jitter), d]`` where ``d`` is the capped backoff.

        Raises:
            TypeError: ``attempt`` is not an int.
            ValueError: ``attempt`` is below 1.
        """
        if type(attempt) is not int:
            raise TypeError(f"attempt must be an int, not {type(attempt).__name__}")
        if attempt < 1:
            raise ValueError(f"attempt counts from 1, got {attempt}")
        try:
            delay = self.retry_initial * self.retry_multiplier ** (attempt - 1)
        except OverflowError:  # far past the cap anyway
            delay = self.retry_max
        delay = min(delay, self.retry_max)
        return delay * (1.0 - self.retry_jitter * rng.random())


_DEFAULT_VALUES: dict[str, object] = {
    field.name: field.default for field in dataclasses.fields(QueuePolicy)
}


def _policy_problem(values: Mapping[str, object]) -> tuple[type[Exception], str] | None:
    """The first field of ``values`` that breaks its rule, as (error type, message), or None."""
    for name, (kind, low, high) in _POLICY_RULES.items():
        value = values[name]
        if kind == "bool":
            if type(value) is not bool:
                return TypeError, f"{name} must be true or false, not {_kind_of(value)} ({value!r})"
            continue
        if value is None and kind == "int?":
            continue
        wanted = "an int" if kind != "float" else "a number"
        if kind == "int?":
            wanted = "an int or None"
        ok_types: tuple[type, ...] = (int,) if kind != "float" else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_types):
            return TypeError, f"{name} must be {wanted}, not {_kind_of(value)} ({value!r:.40})"
        assert isinstance(value, int | float)
        if not math.isfinite(value):
            return ValueError, f"{name} must be finite, got {value!r}"
        if name == "retry_initial" and value <= 0:
            return ValueError, f"retry_initial must be > 0 seconds, got {value!r}"
        if not low <= value <= high:
            limit = f"between {low} and {high}" if high != math.inf else f">= {low}"
            return ValueError, f"{name} must be {limit}, got {value!r}"
    retry_initial, retry_max = values["retry_initial"], values["retry_max"]
    assert isinstance(retry_initial, int | float) and isinstance(retry_max, int | float)
    if retry_max < retry_initial:
        return ValueError, (
            f"retry_max ({retry_max!r}) must be >= retry_initial ({retry_initial!r})"
        )
    return None


def policies_from(
    queues: Mapping[str, QueuePolicy | Mapping[str, object]] | None,
    source: str | None = None,
) -> dict[str, QueuePolicy]:
    """Resolve the ``queues=`` keyword of a cage into one policy per queue name.

    Keys are queue names (``"loopback_queue"``, ``"<cage>_queue"``) or ``"default"``, the policy
    of every queue not named. A value is a ``QueuePolicy``, used as it is, or a mapping of
    field names, whose missing fields come from the ``"default"`` entry (itself filled in from
    ``QueuePolicy()``).

    Args:
        queues: the keyword's value; None means every queue uses ``QueuePolicy()``.
        source: where the mapping came from (a file name), for messages.

    Returns:
        Queue name -> policy, always with a ``"default"`` entry.

    Raises:
        TypeError: ``queues`` or one of its values is not a mapping or policy, or a field has
            the wrong type.
        ValueError: a key is not a queue name or ``"default"``, or a field is invalid.
    """
    suffix = f" in {source}" if source is not None else ""
    if queues is None:
        return {DEFAULT_POLICY_NAME: QueuePolicy()}
    if not isinstance(queues, Mapping):
        raise TypeError(
            f"queues{suffix} must be a mapping of queue name to policy, not {_kind_of(queues)}"
        )
    default = _policy_entry(
        queues.get(DEFAULT_POLICY_NAME, {}), f"queues.default{suffix}", QueuePolicy()
    )
    policies = {DEFAULT_POLICY_NAME: default}
    for name, entry in queues.items():
        if name == DEFAULT_POLICY_NAME:
            continue
        if not isinstance(name, str):
            raise TypeError(f"queues{suffix}: a queue name must be a str, not {_kind_of(name)}")
        try:
            _, queued = parse_target(name)
        except ValueError as error:
            raise ValueError(f"queues{suffix}: {error}") from None
        if not queued:
            raise ValueError(
                f"queues{suffix}: {name!r} is not a queue name; name a queue '<cage>_queue' "
                f"(e.g. '{name}_queue' or 'loopback_queue'), or use 'default'"
            )
        policies[name] = _policy_entry(entry, f"queues.{name}{suffix}", default)
    return policies


def _policy_entry(entry: object, where: str, base: QueuePolicy) -> QueuePolicy:
    if isinstance(entry, QueuePolicy):
        return entry
    if isinstance(entry, Mapping):
        return QueuePolicy.from_mapping(entry, where, base)
    raise TypeError(
        f"{where}: a queue policy must be a QueuePolicy or a mapping, not {_kind_of(entry)}"
    )


_HOST_NAME = re.compile(r"[A-Za-z0-9._-]{1,253}")
_PORT = re.compile(r"[0-9]{1,5}")
_BRACKETED = re.compile(r"\[([^\]]*)\]:(.*)", re.DOTALL)


def parse_address(text: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """Split ``"host:port"`` (or ``"[v6 address]:port"``) into a host and a port number.

    Args:
        text: the address, e.g. ``"127.0.0.1:7001"``, ``"ledger.example:7002"``, ``"[::1]:7003"``.
        allow_port_zero: accept port 0 ("any free port"), which makes sense for listening only.

    Returns:
        ``(host, port)``; an IPv6 host comes without its brackets.

    Raises:
        TypeError: ``text`` is not a str.
        ValueError: no port, a port that is not a number from 1 (or 0) to 65535, an empty
            host, an IPv6 address without brackets, or characters no host name has.
    """
    if not isinstance(text, str):
        raise TypeError(f"an address must be a str 'host:port', not {_kind_of(text)}")
    bracketed = _BRACKETED.fullmatch(text)
    if bracketed is not None:
        host, port_text = bracketed.groups()
        try:
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            raise ValueError(
                f"invalid address {text!r}: {host!r} in brackets is not an IPv6 address"
            ) from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(
                f"invalid address {text!r}: expected 'host:port', e.g. '127.0.0.1:7001'"
            )
        if ":" in host:
            raise ValueError(
                f"invalid address {text!r}: put an IPv6 address in brackets, e.g. '[::1]:7001'"
            )
        if not host:
            raise ValueError(
                f"invalid address {text!r}: the host is missing (use "
                f"'0.0.0.0:{port_text}' to listen on every interface)"
            )
        if _HOST_NAME.fullmatch(host) is None:
            raise ValueError(
                f"invalid address {text!r}: {host!r} is not a host name or an IP address"
            )
    lowest = 0 if allow_port_zero else 1
    if _PORT.fullmatch(port_text) is None or not lowest <= int(port_text) <= 65535:
        raise ValueError(
            f"invalid address {text!r}: the port must be a number from {lowest} "
            f"to 65535, got {port_text!r}"
        )
    return host, int(port_text)


_CAGE_KEYS = (
    "name", "data_dir", "listen", "peers", "secret", "queues",
    "durability", "workers", "retention", "expose", "allow_insecure",
)  # fmt: skip
_REQUIRED_KEYS = ("name", "data_dir")
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_IMPORT_PATH = re.compile(rf"{_DOTTED}(?::{_DOTTED})?", re.ASCII)


def load_config(path: str | os.PathLike[str]) -> dict[str, object]:
    """Read a cage's configuration from a TOML file whose keys are ``Cage``'s keywords.

    Example::

        name = "ledger"
        data_dir = "var/ledger"            # relative to this file's directory
        listen = "127.0.0.1:7002"
        secret = "shared-secret"
        durability = "always"
        [peers]
        billing = "127.0.0.1:7001"         # or a list of addresses
        [expose]
        accounts = "ledger.accounts"       # module name -> "package.module[:attribute]"
        [queues.default]
        retry_max = 60.0
        [queues.billing_queue]
        max_pending = 10000

    Args:
        path: the TOML file.

    Returns:
        Keywords for ``Cage(**kwargs)``: only those the file gives, validated and converted.

    Raises:
        OSError: the file cannot be read (``FileNotFoundError`` names it).
        TypeError: a value has the wrong TOML type; the message names file and key.
        ValueError: the file is not TOML, has an unknown key, misses ``name`` or ``data_dir``,
            or has an invalid value; the message names file and key.
    """
    path = Path(path)
    with path.open("rb") as file:
        try:
            table = tomllib.load(file)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path}: not valid TOML: {error}") from None
    for key in table:
        if key not in _CAGE_KEYS:
            raise ValueError(f"{path}: {_unknown(key, _CAGE_KEYS, 'key')}")
    for key in _REQUIRED_KEYS:
        if key not in table:
            raise ValueError(f"{path}: {key!r} is missing; a cage needs a name and a data_dir")
    config: dict[str, object] = {}
    for key, value in table.items():
        if key == "queues":  # its messages name the table and the file themselves
            config[key] = _convert_queues(value, path)
            continue
        try:
            config[key] = _CONVERTERS[key](value, path)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{path}: {key}: {error}") from None
    return config


def _string(value: object, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise TypeError(f"must be {what}, not {_kind_of(value)} ({value!r:.40})")
    return value


def _convert_name(value: object, path: Path) -> str:
    return check_cage_name(_string(value))


def _convert_data_dir(value: object, path: Path) -> str:
    text = _string(value, "a string (a directory)")
    if not text:
        raise ValueError("must name a directory, got ''")
    directory = Path(text).expanduser()
    return str(directory if directory.is_absolute() else path.parent / directory)


def _convert_listen(value: object, path: Path) -> str:
    text = _string(value, "a string 'host:port'")
    parse_address(text, allow_port_zero=True)
    return text


def _convert_peers(value: object, path: Path) -> dict[str, str | list[str]]:
    if not isinstance(value, dict):
        raise TypeError(f"must be a table of cage name = 'host:port', not {_kind_of(value)}")
    peers: dict[str, str | list[str]] = {}
    for name, addresses in value.items():
        check_cage_name(name)
        if isinstance(addresses, list):
            if not addresses:
                raise ValueError(f"peer {name!r} has an empty list of addresses")
            for address in addresses:
                parse_address(_string(address, f"a string 'host:port' (peer {name!r})"))
            peers[name] = list(addresses)
        else:
            parse_address(_string(addresses, f"a string 'host:port' or a list (peer {name!r})"))
            peers[name] = addresses
    return peers


def _convert_secret(value: object, path: Path) -> bytes:
    text = _string(value)
    if not text:
        raise ValueError("must not be empty (leave 'secret' out to run without one)")
    return text.encode("utf-8")


def _convert_queues(value: object, path: Path) -> dict[str, QueuePolicy]:
    if not isinstance(value, dict):
        raise TypeError(f"{path}: queues: must be a table of queue tables, not {_kind_of(value)}")
    return policies_from(value, source=str(path))


def _convert_allow_insecure(value: object, path: Path) -> bool:
    if type(value) is not bool:
        raise ValueError(f"must be true or false, not {value!r}")
    return value


def _convert_durability(value: object, path: Path) -> str:
    text = _string(value)
    if text not in DURABILITY_MODES:
        raise ValueError(f"must be one of {', '.join(map(repr, DURABILITY_MODES))}, got {text!r}")
    return text


def _convert_workers(value: object, path: Path) -> int:
    if type(value) is not int:
        raise TypeError(f"must be an integer, not {_kind_of(value)} ({value!r:.40})")
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


def _convert_retention(value: object, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"must be a number of seconds, not {_kind_of(value)} ({value!r:.40})")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def _convert_expose(value: object, path: Path) -> dict[str, str]:
    if not isinstance(value, dict):
        raise TypeError(f"must be a table of module name = 'package.module', not {_kind_of(value)}")
    expose: dict[str, str] = {}
    for name, target in value.items():
        check_module_name(name)
        text = _string(target, f"a string 'package.module[:attribute]' (module {name!r})")
        if _IMPORT_PATH.fullmatch(text) is None:
            raise ValueError(
                f"module {name!r}: {text!r} is not an import path like "
                f"'package.module' or 'package.module:attribute'"
            )
        expose[name] = text
    return expose


_CONVERTERS = {
    "name": _convert_name,
    "data_dir": _convert_data_dir,
    "listen": _convert_listen,
    "peers": _convert_peers,
    "secret": _convert_secret,
    "durability": _convert_durability,
    "workers": _convert_workers,
    "retention": _convert_retention,
    "expose": _convert_expose,
    "allow_insecure": _convert_allow_insecure,
}


def _unknown(key: object, known: Mapping[str, object] | tuple[str, ...], what: str) -> str:
    """``unknown key 'retry_mx' (did you mean 'retry_max'?); known keys: ...``."""
    names = sorted(known)
    close = difflib.get_close_matches(str(key), names, n=1)
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} {key!r}{guess}; known: {', '.join(names)}"


_TOML_KINDS = {
    str: "a string",
    int: "an integer",
    float: "a float",
    bool: "a boolean",
    dict: "a table",
    list: "an array",
}


def _kind_of(value: object) -> str:
    """What ``value`` is, in the words of TOML where it can be: ``an integer``, ``a table``."""
    kind = _TOML_KINDS.get(type(value))
    if kind is not None:
        return kind
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"
