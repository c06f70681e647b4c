"""Test helpers shared by the cage tests: a waitable log, polling, limits.

Owns: small tools that several test files use. Must not: start anything by itself (the
``make_cage`` fixture in conftest.py does that) or assert on timing.

The cage tests share these conventions: each cage runs on a data directory under ``tmp_path``
on the real disk (never tmpfs, where fsync does nothing); nothing asserts on time; waiting is
``cage.drain(timeout=...)``, ``wait_until`` or an Event with the generous ``LIMIT_S``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pmq

#: How long any wait may take before the test calls it a hang (not a measured time).
LIMIT_S = 60.0
#: Queue policy that makes retries come at once.
FAST_RETRY = {"retry_initial": 0.01, "retry_max": 0.05}
KIB = 1024
MIB = 1024 * KIB


class Log:
    """A thread-safe list of what handlers saw, with a way to wait for a number of entries."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._cond = threading.Condition()

    def add(self, item: Any) -> None:
        """Record one entry and wake whoever waits."""
        with self._cond:
            self.items.append(item)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = LIMIT_S) -> list[Any]:
        """Wait until `count` entries are there; fail the test if they never come."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.items) >= count, timeout)
            assert ok, f"only {len(self.items)} of {count} entries after {timeout} s"
            return list(self.items)


def next_seq(cage: pmq.Cage) -> int:
    """The journal's next sequence number: unchanged means nothing was stored."""
    assert cage.store is not None
    return cage.store.journal.next_seq


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = LIMIT_S) -> None:
    """Poll `predicate` until it holds; fail naming `what` if it never does."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: still not true after {timeout} s"
        time.sleep(0.01)
