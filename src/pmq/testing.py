"""pytest fixtures for users' own test suites: temporary cages, pairs of cages, waiting for them.

Installing pmq registers this module as a pytest plugin (the ``pytest11`` entry point ``pmq``),
so a user's tests just name the fixtures::

    def test_credit_is_booked(pmq_cage):
        ledger = Ledger()
        pmq_cage.expose("ledger", ledger)
        pmq_cage.execute.on("loopback_queue").ledger.credit(42, amount=10)
        pmq_cage.drain(timeout=10)            # every queued call completed or dead: no sleep()
        assert ledger.balance(42) == 10

Fixtures:
    ``pmq_cage_factory``: a ``CageFactory``; ``pmq_cage_factory("billing", expose=...)`` makes a
        started cage whose data directory is under the test's ``tmp_path``. Every cage it made
        is stopped when the test ends, passed or failed.
    ``pmq_cage``: one started cage named ``"test"`` that exposes nothing yet; expose modules
        with ``pmq_cage.expose(name, obj)`` before queueing calls to them.
    ``pmq_cage_pair``: a ``CagePair`` ``(a, b)``: two started cages named ``"a"`` and ``"b"``
        that listen on free ports of 127.0.0.1 and are peers of each other.

Owns: the fixtures and the small classes they return. Must not: change anything global (log
levels, markers, environment, the default event loop) or be imported by ``pmq`` itself: only
pytest loads it, so ``import pmq`` never imports pytest.

Invariants:
- Data directories live under ``tmp_path``, on the real disk (fsync on tmpfs does nothing and
  would hide what a user's test meant to check), and are never shared between tests.
- A cage made by a fixture is stopped at teardown even when the test or another cage's stop
  failed; a failed stop fails the test instead of passing silently.
- Nothing here sleeps for a fixed time: waiting is ``drain``, which returns as soon as the
  calls are done and raises ``pmq.Timeout`` when they are not.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import pmq
from pmq.cage import Cage

__all__ = ["FAST_RETRY", "CageFactory", "CagePair"]

#: A queue policy whose retries come after 10-50 ms instead of 1-300 s, so a test of a failing
#: handler reaches its dead letter quickly: ``queues={"default": {**FAST_RETRY,
#: "max_attempts": 3}}``.
FAST_RETRY: Mapping[str, float] = {"retry_initial": 0.01, "retry_max": 0.05}
#: The default limit of ``CagePair.drain``: long enough for a slow CI machine, short enough
#: that a test whose calls never finish fails instead of hanging.
DRAIN_TIMEOUT_S = 60.0
#: Tries at starting a pair when another process takes the port chosen for ``b`` between
#: choosing it and binding it.
PAIR_PORT_TRIES = 5
LOOPBACK = "127.0.0.1"


class CagePair(NamedTuple):
    """Two started cages that are peers of each other: ``a, b = pmq_cage_pair``."""

    a: Cage
    b: Cage

    def drain(self, timeout: float | None = DRAIN_TIMEOUT_S) -> None:
        """Wait until neither cage has a call left: sent, run, and whatever those queued.

        ``a.drain()`` alone returns once b has accepted a's calls, not once b has run them;
        a handler on b may queue calls back to a. This waits until a whole round finds both
        cages idle and no call made or accepted anywhere during the round.

        Raises:
            pmq.Timeout: calls were still pending after `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            before = _calls_seen(self)
            for cage in self:
                cage.drain(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if _calls_seen(self) == before and all(_outstanding(cage) == 0 for cage in self):
                return


class CageFactory:
    """Makes cages in temporary data directories and stops them all at teardown.

    ``factory(name, **keywords)`` takes ``pmq.Cage``'s keywords (``expose=``, ``queues=``,
    ``durability=``, ``listen=``, ``peers=``, ...). The data directory is
    ``<tmp_path>/pmq/<name>`` unless ``data_dir=`` says otherwise, so making a cage of the same
    name again, after stopping the first, reopens its directory: a test of what survives a
    restart. ``start=False`` returns the cage unstarted (for ``async with cage:``).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        #: Every cage made, in order; teardown stops them in reverse.
        self.cages: list[Cage] = []

    def __call__(self, name: str = "test", *, data_dir: str | Path | None = None,
                 start: bool = True, **keywords: Any) -> Cage:
        """A new cage named `name`, started unless `start` is False.

        Raises:
            ValueError, TypeError: a bad keyword, as ``pmq.Cage`` raises them.
            pmq.JournalLocked: a running cage already has this data directory.
            OSError: the listening address is taken.
        """
        cage = Cage(name, data_dir=self.root / name if data_dir is None else data_dir,
                    **keywords)
        self.cages.append(cage)
        if start:
            cage.start()
        return cage

    def pair(self, a: str = "a", b: str = "b", **keywords: Any) -> CagePair:
        """Two started cages on free ports of 127.0.0.1, each a peer of the other.

        `keywords` go to both cages (``queues=``, ``secret=``, ``expose=``, ...); give each its
        own modules with ``pair.a.expose(...)`` / ``pair.b.expose(...)``.

        Raises:
            OSError: no free port could be bound after a few tries.
        """
        for attempt in range(PAIR_PORT_TRIES):
            # A listens on a port the OS picks; b's port has to be named to a before b exists.
            port_b = _free_port()
            first = self(a, listen=f"{LOOPBACK}:0", peers={b: f"{LOOPBACK}:{port_b}"},
                         **keywords)
            assert first.address is not None
            try:
                second = self(b, listen=f"{LOOPBACK}:{port_b}",
                              peers={a: f"{LOOPBACK}:{first.address[1]}"}, **keywords)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or attempt == PAIR_PORT_TRIES - 1:
                    raise
                first.stop()  # someone took port_b in the meantime: start both again
                continue
            return CagePair(first, second)
        raise AssertionError("unreachable")  # pragma: no cover

    def stop_all(self) -> None:
        """Stop every cage made here, newest first; raise what failed once all are stopped."""
        errors: list[Exception] = []
        for cage in reversed(self.cages):
            try:
                cage.stop()
            except Exception as exc:  # the others must still be stopped and their dirs released
                errors.append(exc)
        self.cages.clear()
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup("stopping the test's pmq cages failed", errors)


def _free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (the OS's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def _outstanding(cage: Cage) -> int:
    store = cage.store
    if store is None:
        raise RuntimeError(f"cage {cage.name!r} is not started")
    return store.outstanding()


def _calls_seen(cages: CagePair) -> int:
    """Calls made or accepted by the cages so far: it grows whenever a new call appears."""
    total = 0
    for cage in cages:
        counters = cage.stats()["counters"]
        total += counters["enqueued"] + counters["accepted"]
    return total


# ---- the plugin ----------------------------------------------------------------------------


def pytest_report_header(config: pytest.Config) -> str:
    """Say which pmq the tests run against: a wheel's site-packages, or a checkout's src/."""
    return f"pmq {pmq.__version__} from {Path(pmq.__file__ or '?').parent}"


@pytest.fixture
def pmq_cage_factory(tmp_path: Path) -> Iterator[CageFactory]:
    """Make started cages with data directories under ``tmp_path``; all stop at teardown.

    ``pmq_cage_factory("billing", expose={"invoices": invoices}, queues={...})``; see
    ``pmq.testing.CageFactory``.
    """
    factory = CageFactory(tmp_path / "pmq")
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def pmq_cage(pmq_cage_factory: CageFactory) -> Cage:
    """One started cage named "test" that exposes nothing yet: call ``pmq_cage.expose(...)``."""
    return pmq_cage_factory("test")


@pytest.fixture
def pmq_cage_pair(pmq_cage_factory: CageFactory) -> CagePair:
    """Cages "a" and "b" on free ports of 127.0.0.1, peers of each other: ``a, b = ...``."""
    return pmq_cage_factory.pair()
