"""Queue policies, addresses and TOML configuration (pmq._config).

What must hold (the module docstring of pmq._config):
- a QueuePolicy that exists is valid, however it was made; every bad field raises TypeError
  (wrong type) or ValueError (out of range) naming the field, the value and where it came from;
- retry delays grow by the multiplier from retry_initial, stop at retry_max, and jitter only ever
  shortens them, by at most retry_jitter of the delay;
- load_config turns a TOML file into Cage keywords, resolves a relative data_dir against the
  file's directory (not the working directory), and names the file and key in every error.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pmq._config import QueuePolicy, load_config, parse_address, policies_from

WHERE = "queues.ledger_queue in cage.toml"


# ---- QueuePolicy ------------------------------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    """A policy made without arguments has the documented defaults."""
    policy = QueuePolicy()
    assert dataclasses.asdict(policy) == {
        "concurrency": 512,
        "ordered": False,
        "retry_initial": 1.0,
        "retry_max": 300.0,
        "retry_multiplier": 2.0,
        "retry_jitter": 0.5,
        "max_attempts": None,
        "max_crashes": 3,
        "max_pending": 1_000_000,
        "max_pending_bytes": 1 << 30,
    }


def test_int_seconds_are_stored_as_floats() -> None:
    """An int is welcome where seconds are asked for; the field then holds a float."""
    policy = QueuePolicy(retry_initial=2, retry_max=10, retry_multiplier=3, retry_jitter=0)
    assert (policy.retry_initial, policy.retry_max, policy.retry_multiplier) == (2.0, 10.0, 3.0)
    assert all(type(value) is float for value in (policy.retry_initial, policy.retry_jitter))


def test_policy_is_frozen() -> None:
    """A policy cannot be changed after it was made."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        QueuePolicy().concurrency = 3  # type: ignore[misc]


def test_replace_validates_too() -> None:
    """dataclasses.replace goes through the same checks as the constructor."""
    with pytest.raises(ValueError, match="concurrency must be >= 1, got 0"):
        dataclasses.replace(QueuePolicy(), concurrency=0)


@pytest.mark.parametrize(
    ("field", "value", "error", "fragment"),
    [
        ("concurrency", 0, ValueError, "concurrency must be >= 1, got 0"),
        ("concurrency", 2.5, TypeError, "concurrency must be an int, not a float (2.5)"),
        ("concurrency", True, TypeError, "concurrency must be an int, not a boolean"),
        ("ordered", 1, TypeError, "ordered must be true or false, not an integer (1)"),
        ("ordered", "yes", TypeError, "ordered must be true or false, not a string"),
        ("retry_initial", 0, ValueError, "retry_initial must be > 0 seconds, got 0"),
        ("retry_initial", -1.0, ValueError, "retry_initial must be > 0 seconds"),
        ("retry_initial", math.nan, ValueError, "retry_initial must be finite, got nan"),
        ("retry_initial", "1", TypeError, "retry_initial must be a number, not a string ('1')"),
        ("retry_max", math.inf, ValueError, "retry_max must be finite, got inf"),
        ("retry_max", 0.5, ValueError, "retry_max (0.5) must be >= retry_initial (1.0)"),
        ("retry_multiplier", 0.5, ValueError, "retry_multiplier must be >= 1, got 0.5"),
        ("retry_jitter", 1.5, ValueError, "retry_jitter must be between 0 and 1, got 1.5"),
        ("retry_jitter", -0.1, ValueError, "retry_jitter must be between 0 and 1, got -0.1"),
        ("max_attempts", 0, ValueError, "max_attempts must be >= 1, got 0"),
        ("max_attempts", 2.0, TypeError, "max_attempts must be an int or None, not a float"),
        ("max_crashes", 0, ValueError, "max_crashes must be >= 1, got 0"),
        ("max_pending", -5, ValueError, "max_pending must be >= 1, got -5"),
        ("max_pending_bytes", "1GB", TypeError, "max_pending_bytes must be an int, not a string"),
        ("max_pending_bytes", 0, ValueError, "max_pending_bytes must be >= 1, got 0"),
    ],
)
def test_each_invalid_field_is_named_with_its_value(
    field: str, value: object, error: type[Exception], fragment: str
) -> None:
    """The constructor and from_mapping both name the field, the value and the rule."""
    with pytest.raises(error) as made:
        QueuePolicy(**{field: value})  # type: ignore[arg-type]
    assert str(made.value).startswith(f"QueuePolicy: {fragment}")
    with pytest.raises(error) as mapped:
        QueuePolicy.from_mapping({field: value}, WHERE)
    assert str(mapped.value).startswith(f"{WHERE}: {fragment}")


def test_limits_at_their_edges_are_accepted() -> None:
    """The smallest valid values and a jitter of exactly 0 or 1 are fine."""
    QueuePolicy(concurrency=1, retry_initial=1e-9, retry_max=1e-9, retry_multiplier=1.0)
    QueuePolicy(retry_jitter=0.0, max_attempts=1, max_crashes=1, max_pending=1)
    QueuePolicy(retry_jitter=1, ordered=True, max_pending_bytes=1)


# ---- retry_delay ------------------------------------------------------------------------------


def test_delays_double_from_initial_until_the_cap_without_jitter() -> None:
    """With no jitter the delays are initial * multiplier ** (attempt - 1), capped."""
    policy = QueuePolicy(retry_initial=1.0, retry_max=300.0, retry_multiplier=2.0, retry_jitter=0)
    rng = random.Random(7)
    delays = [policy.retry_delay(attempt, rng) for attempt in range(1, 12)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 300.0, 300.0]


def test_huge_attempt_numbers_stay_at_the_cap() -> None:
    """An attempt number whose power overflows a float still gives retry_max."""
    policy = QueuePolicy(retry_jitter=0)
    assert policy.retry_delay(10**6, random.Random(1)) == 300.0


def test_multiplier_of_one_gives_a_constant_delay() -> None:
    """retry_multiplier=1 retries at retry_initial every time."""
    policy = QueuePolicy(retry_initial=5, retry_multiplier=1, retry_jitter=0)
    assert {policy.retry_delay(attempt, random.Random(0)) for attempt in (1, 2, 50)} == {5.0}


@pytest.mark.parametrize("jitter", [0.0, 0.1, 0.5, 1.0])
def test_jitter_stays_in_its_range_and_uses_it(jitter: float) -> None:
    """Every delay is in (d * (1 - jitter), d]; over many draws, both ends are approached."""
    policy = QueuePolicy(retry_initial=2.0, retry_max=50.0, retry_jitter=jitter)
    rng = random.Random(12345)
    for attempt, full in [(1, 2.0), (3, 8.0), (9, 50.0)]:
        delays = [policy.retry_delay(attempt, rng) for _ in range(2000)]
        assert all(full * (1 - jitter) <= delay <= full for delay in delays)
        assert all(delay > 0 for delay in delays) or jitter == 1.0
        assert max(delays) > full * (1 - 0.05 * jitter) - 1e-12
        assert min(delays) < full * (1 - 0.95 * jitter) + 1e-12


def test_same_seed_gives_the_same_delays() -> None:
    """The delay depends only on the policy, the attempt and the random source."""
    policy = QueuePolicy()
    first = [policy.retry_delay(n, random.Random(99)) for n in range(1, 20)]
    assert first == [policy.retry_delay(n, random.Random(99)) for n in range(1, 20)]


@given(
    st.floats(1e-3, 1e3),
    st.floats(1.0, 10.0),
    st.floats(0.0, 1.0),
    st.integers(1, 10_000),
    st.integers(0, 2**32),
)
def test_delay_never_exceeds_the_cap(
    initial: float, multiplier: float, jitter: float, attempt: int, seed: int
) -> None:
    """For any valid policy and attempt, 0 <= delay <= retry_max."""
    policy = QueuePolicy(
        retry_initial=initial,
        retry_max=initial * 100,
        retry_multiplier=multiplier,
        retry_jitter=jitter,
    )
    delay = policy.retry_delay(attempt, random.Random(seed))
    assert 0.0 <= delay <= policy.retry_max


@pytest.mark.parametrize(
    ("attempt", "error", "fragment"),
    [(0, ValueError, "counts from 1"), (-3, ValueError, "counts from 1"),
     (1.0, TypeError, "must be an int"), (True, TypeError, "must be an int")],
)  # fmt: skip
def test_invalid_attempt_numbers_are_refused(
    attempt: Any, error: type[Exception], fragment: str
) -> None:
    """Attempts count from 1 and are ints."""
    with pytest.raises(error, match=fragment):
        QueuePolicy().retry_delay(attempt, random.Random(0))


# ---- from_mapping and policies_from -----------------------------------------------------------


def test_unknown_policy_key_is_named_with_a_suggestion() -> None:
    """A misspelt key names itself, where it was, the closest known key and all known keys."""
    with pytest.raises(ValueError) as caught:
        QueuePolicy.from_mapping({"retry_mx": 3}, WHERE)
    message = str(caught.value)
    assert message.startswith(f"{WHERE}: unknown queue policy key 'retry_mx'")
    assert "did you mean 'retry_max'?" in message
    assert "max_pending_bytes" in message


def test_from_mapping_fills_missing_fields_from_base() -> None:
    """Fields a mapping leaves out come from the base policy, or the defaults."""
    base = QueuePolicy(concurrency=4, retry_max=60)
    policy = QueuePolicy.from_mapping({"ordered": True}, WHERE, base)
    assert (policy.concurrency, policy.retry_max, policy.ordered) == (4, 60.0, True)
    assert QueuePolicy.from_mapping({}, WHERE) == QueuePolicy()


def test_from_mapping_checks_the_merged_values() -> None:
    """retry_initial above the base's retry_max is caught, naming both."""
    with pytest.raises(ValueError, match=r"retry_max \(60.0\) must be >= retry_initial \(90"):
        QueuePolicy.from_mapping({"retry_initial": 90}, WHERE, QueuePolicy(retry_max=60))


def test_from_mapping_refuses_a_non_mapping() -> None:
    """A policy given as a list is a TypeError naming where."""
    with pytest.raises(TypeError, match=f"^{WHERE}: a queue policy must be a table"):
        QueuePolicy.from_mapping([("concurrency", 1)], WHERE)  # type: ignore[arg-type]


def test_no_queues_means_one_default_policy() -> None:
    """Without queues= every queue uses QueuePolicy()."""
    assert policies_from(None) == {"default": QueuePolicy()}
    assert policies_from({}) == {"default": QueuePolicy()}


def test_queue_mappings_inherit_from_default() -> None:
    """A queue's mapping overrides the 'default' entry, which overrides QueuePolicy()."""
    given_policy = QueuePolicy(concurrency=2)
    policies = policies_from(
        {
            "default": {"retry_max": 30, "max_crashes": 5},
            "ledger_queue": {"ordered": True},
            "loopback_queue": {"retry_max": 90},
            "audit_queue": given_policy,
        }
    )
    assert policies["default"] == QueuePolicy(retry_max=30, max_crashes=5)
    assert policies["ledger_queue"] == QueuePolicy(retry_max=30, max_crashes=5, ordered=True)
    assert policies["loopback_queue"] == QueuePolicy(retry_max=90, max_crashes=5)
    assert policies["audit_queue"] is given_policy


def test_default_given_as_a_policy_is_the_base_of_the_others() -> None:
    """'default' may itself be a QueuePolicy."""
    policies = policies_from({"default": QueuePolicy(concurrency=3), "x_queue": {"ordered": True}})
    assert policies["x_queue"] == QueuePolicy(concurrency=3, ordered=True)


@pytest.mark.parametrize(
    ("queues", "error", "fragment"),
    [
        ({"ledger": {}}, ValueError, "'ledger' is not a queue name"),
        ({"a b_queue": {}}, ValueError, "invalid target 'a b_queue'"),
        ({"x_queue_queue": {}}, ValueError, "ends in '_queue'"),
        ({"ledger_queue": 5}, TypeError, "queues.ledger_queue: a queue policy must be"),
        ({"ledger_queue": {"bogus": 1}}, ValueError, "queues.ledger_queue: unknown"),
        ({"default": {"concurrency": 0}}, ValueError, "queues.default: concurrency must be"),
        ({3: {}}, TypeError, "a queue name must be a str"),
        ([("ledger_queue", {})], TypeError, "must be a mapping of queue name"),
    ],
)
def test_bad_queues_are_named(queues: Any, error: type[Exception], fragment: str) -> None:
    """Each bad entry of queues= names the queue and the problem."""
    with pytest.raises(error) as caught:
        policies_from(queues)
    assert fragment in str(caught.value)


# ---- parse_address ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7001", ("127.0.0.1", 7001)),
        ("localhost:1", ("localhost", 1)),
        ("ledger.example.com:65535", ("ledger.example.com", 65535)),
        ("0.0.0.0:8080", ("0.0.0.0", 8080)),
        ("[::1]:7003", ("::1", 7003)),
        ("[fe80::1%eth0]:7003", ("fe80::1%eth0", 7003)),
        ("my_host-2:99", ("my_host-2", 99)),
    ],
)
def test_addresses_split_into_host_and_port(text: str, expected: tuple[str, int]) -> None:
    """host:port and [IPv6]:port are split; brackets are removed."""
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("localhost", "expected 'host:port'"),
        (":7001", "the host is missing"),
        ("::1:7001", "put an IPv6 address in brackets"),
        ("[nonsense]:1", "is not an IPv6 address"),
        ("host:0", "from 1 to 65535, got '0'"),
        ("host:65536", "got '65536'"),
        ("host:-1", "got '-1'"),
        ("host: 80", "got ' 80'"),
        ("host:http", "got 'http'"),
        ("host:", "got ''"),
        ("a b:80", "'a b' is not a host name"),
        ("[::1]:", "got ''"),
    ],
)
def test_bad_addresses_are_named(text: str, fragment: str) -> None:
    """Each bad address quotes itself and says what is wrong."""
    with pytest.raises(ValueError) as caught:
        parse_address(text)
    assert str(caught.value).startswith(f"invalid address {text!r}: ")
    assert fragment in str(caught.value)


def test_port_zero_is_allowed_only_on_request() -> None:
    """Port 0 ('any free port') makes sense for listening, so it must be asked for."""
    assert parse_address("127.0.0.1:0", allow_port_zero=True) == ("127.0.0.1", 0)
    with pytest.raises(ValueError, match="from 1 to 65535"):
        parse_address("127.0.0.1:0")


def test_address_of_wrong_type_is_a_type_error() -> None:
    """An address must be a str."""
    with pytest.raises(TypeError, match="an address must be a str 'host:port', not a tuple"):
        parse_address(("127.0.0.1", 7001))  # type: ignore[arg-type]


# ---- load_config ------------------------------------------------------------------------------

FULL = """
name = "ledger"
data_dir = "var/ledger"
listen = "127.0.0.1:0"
secret = "shared-s\u00e9cret"
durability = "interval"
workers = 8
retention = 3600

[peers]
billing = "127.0.0.1:7001"
audit = ["10.0.0.1:7003", "[::1]:7003"]

[expose]
accounts = "ledger.accounts"
log = "ledger.audit:Log"

[queues.default]
retry_max = 60

[queues.billing_queue]
max_pending = 10_000
ordered = true
"""


def write(tmp_path: Path, text: str, name: str = "cage.toml") -> Path:
    """``text`` as the TOML file ``name`` in a fresh ``conf`` directory under tmp_path."""
    directory = tmp_path / "conf"
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def test_full_file_becomes_cage_keywords(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key is converted: data_dir resolved, secret bytes, queues policies."""
    path = write(tmp_path, FULL)
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    assert config == {
        "name": "ledger",
        "data_dir": str(path.parent / "var" / "ledger"),
        "listen": "127.0.0.1:0",
        "secret": "shared-s\u00e9cret".encode(),
        "durability": "interval",
        "workers": 8,
        "retention": 3600.0,
        "peers": {"billing": "127.0.0.1:7001", "audit": ["10.0.0.1:7003", "[::1]:7003"]},
        "expose": {"accounts": "ledger.accounts", "log": "ledger.audit:Log"},
        "queues": {
            "default": QueuePolicy(retry_max=60),
            "billing_queue": QueuePolicy(retry_max=60, max_pending=10_000, ordered=True),
        },
    }


def test_minimal_file_gives_only_its_keys(tmp_path: Path) -> None:
    """Keys the file leaves out are left out, so Cage's own defaults apply."""
    path = write(tmp_path, 'name = "solo"\ndata_dir = "/srv/solo"\n')
    assert load_config(str(path)) == {"name": "solo", "data_dir": "/srv/solo"}


def test_relative_data_dir_is_relative_to_the_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data_dir = "var" next to /x/conf/cage.toml means /x/conf/var, wherever we run from."""
    path = write(tmp_path, 'name = "a"\ndata_dir = "../state/a"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(path)["data_dir"] == str(tmp_path / "conf" / ".." / "state" / "a")


def test_home_relative_data_dir_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data_dir = "~/x" is under the user's home directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(tmp_path, 'name = "a"\ndata_dir = "~/pmq"\n')
    assert load_config(path)["data_dir"] == str(tmp_path / "home" / "pmq")


@pytest.mark.parametrize(
    ("body", "error", "fragment"),
    [
        ('nmae = "a"\n', ValueError, "unknown key 'nmae' (did you mean 'name'?)"),
        ('name = "a"\n', ValueError, "'data_dir' is missing"),
        ('data_dir = "d"\n', ValueError, "'name' is missing"),
        ("name = \n", ValueError, "not valid TOML"),
        ('name = "a_queue"\ndata_dir = "d"\n', ValueError, "name: invalid cage name 'a_queue'"),
        ('name = 5\ndata_dir = "d"\n', TypeError, "name: must be a string, not an integer (5)"),
        ('name = "a"\ndata_dir = ""\n', ValueError, "data_dir: must name a directory"),
        ('name = "a"\ndata_dir = "d"\nworkers = "16"\n', TypeError,
         "workers: must be an integer, not a string ('16')"),
        ('name = "a"\ndata_dir = "d"\nworkers = 0\n', ValueError, "workers: must be >= 1"),
        ('name = "a"\ndata_dir = "d"\nretention = -1\n', ValueError, "retention: must be"),
        ('name = "a"\ndata_dir = "d"\nretention = "3d"\n', TypeError, "retention: must be a"),
        ('name = "a"\ndata_dir = "d"\ndurability = "sometimes"\n', ValueError,
         "durability: must be one of 'always', 'interval', 'never', got 'sometimes'"),
        ('name = "a"\ndata_dir = "d"\nsecret = ""\n', ValueError, "secret: must not be empty"),
        ('name = "a"\ndata_dir = "d"\nsecret = 12\n', TypeError, "secret: must be a string"),
        ('name = "a"\ndata_dir = "d"\nlisten = "nowhere"\n', ValueError,
         "listen: invalid address 'nowhere'"),
        ('name = "a"\ndata_dir = "d"\npeers = "b:1"\n', TypeError, "peers: must be a table"),
        ('name = "a"\ndata_dir = "d"\n[peers]\nb = "b:0"\n', ValueError,
         "peers: invalid address 'b:0'"),
        ('name = "a"\ndata_dir = "d"\n[peers]\n"b c" = "b:1"\n', ValueError,
         "peers: invalid cage name 'b c'"),
        ('name = "a"\ndata_dir = "d"\n[peers]\nb = []\n', ValueError, "empty list of addresses"),
        ('name = "a"\ndata_dir = "d"\n[peers]\nb = [1]\n', TypeError, "(peer 'b')"),
        ('name = "a"\ndata_dir = "d"\n[expose]\n_x = "m"\n', ValueError,
         "expose: invalid module name '_x'"),
        ('name = "a"\ndata_dir = "d"\n[expose]\nx = "a b"\n', ValueError,
         "expose: module 'x': 'a b' is not an import path"),
        ('name = "a"\ndata_dir = "d"\n[expose]\nx = 1\n', TypeError, "expose: must be a string"),
        ('name = "a"\ndata_dir = "d"\nqueues = 3\n', TypeError, "queues: must be a table"),
        ('name = "a"\ndata_dir = "d"\nallow_insecure = "yes"\n', ValueError,
         "allow_insecure: must be true or false"),
    ],
)  # fmt: skip
def test_each_bad_file_names_file_and_key(
    tmp_path: Path, body: str, error: type[Exception], fragment: str
) -> None:
    """Every error from a file starts with the file's path and names the key."""
    path = write(tmp_path, body)
    with pytest.raises(error) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert fragment in message


def test_bad_queue_policy_names_queue_and_file(tmp_path: Path) -> None:
    """A queue table's error reads 'queues.<name> in <file>: <field> ...'."""
    path = write(tmp_path, 'name = "a"\ndata_dir = "d"\n[queues.ledger_queue]\nretry_max = 0.5\n')
    with pytest.raises(ValueError) as caught:
        load_config(path)
    assert str(caught.value) == (
        f"queues.ledger_queue in {path}: retry_max (0.5) must be >= retry_initial (1.0)"
    )


def test_unknown_queue_policy_key_names_queue_and_file(tmp_path: Path) -> None:
    """An unknown key inside a queue table names the key, the queue and the file."""
    path = write(tmp_path, 'name = "a"\ndata_dir = "d"\n[queues.default]\nconcurency = 4\n')
    with pytest.raises(ValueError, match="unknown queue policy key 'concurency'") as caught:
        load_config(path)
    assert str(caught.value).startswith(f"queues.default in {path}: ")
    assert "did you mean 'concurrency'?" in str(caught.value)


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    """A file that does not exist raises FileNotFoundError naming it."""
    with pytest.raises(FileNotFoundError, match=r"nope\.toml"):
        load_config(tmp_path / "nope.toml")
