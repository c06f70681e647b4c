"""Shared test machinery: temporary journals, Hypothesis profiles and the torture switch.

Owns: fixtures every test file may use (``journal_dir``, ``make_journal``, ``make_cage``), the
Hypothesis profiles, and the rule that tests marked ``@pytest.mark.torture`` run only when
``PMQ_TORTURE=1`` (``make torture``). Must not: know anything about one test file; keep it
generic so the store and cage tests can use it too.

Invariants:
- Every journal a test opens through ``make_journal`` is closed when the test ends, even when the
  test failed or left the journal failed.
- Directories live under pytest's ``tmp_path``, on a real file system: fsync on tmpfs
  (``/dev/shm``) is a no-op and would hide durability bugs.
- Nothing here asserts on time: a slow, noisy 2-core machine must pass the same tests.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

import pmq

#: True when the long crash and soak runs are wanted (``make torture`` sets PMQ_TORTURE=1).
TORTURE = os.environ.get("PMQ_TORTURE", "") == "1"

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]

# deadline=None everywhere: examples fsync on a real disk, whose latency is not ours to judge.
settings.register_profile(
    "default", deadline=None, max_examples=40, suppress_health_check=_SLOW_OK, print_blob=True
)
settings.register_profile(
    "torture", deadline=None, max_examples=1000, suppress_health_check=_SLOW_OK, print_blob=True
)
settings.load_profile("torture" if TORTURE else "default")


def rounds(default: int, torture: int) -> int:
    """How many rounds a repeated test runs: ``torture`` under PMQ_TORTURE=1, else ``default``."""
    return torture if TORTURE else default


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``torture`` unless PMQ_TORTURE=1."""
    if TORTURE:
        return
    skip = pytest.mark.skip(reason="torture run only: PMQ_TORTURE=1 (make torture)")
    for item in items:
        if item.get_closest_marker("torture") is not None:
            item.add_marker(skip)


@pytest.fixture
def journal_dir(tmp_path: Path) -> Path:
    """An empty directory for one journal, on the real disk."""
    directory = tmp_path / "journal"
    directory.mkdir()
    return directory


@pytest.fixture
def make_journal(journal_dir: Path) -> Iterator[Callable[..., Any]]:
    """Open journals (in ``journal_dir`` unless told otherwise) and close them all at teardown.

    Usage: ``journal = make_journal(segment_bytes=64 * 1024)`` or
    ``make_journal(other_dir, durability="never")``.
    """
    from pmq._journal import Journal
    from pmq.errors import JournalError

    opened: list[Any] = []

    def make(directory: str | os.PathLike[str] | None = None, **kwargs: Any) -> Any:
        journal = Journal(journal_dir if directory is None else directory, **kwargs)
        opened.append(journal)
        return journal

    yield make
    for journal in reversed(opened):
        # A test may have failed the journal on purpose; closing it must still release it.
        with contextlib.suppress(JournalError):
            journal.close()


@pytest.fixture
def make_cage(tmp_path: Path) -> Iterator[Callable[..., pmq.Cage]]:
    """Make cages on directories under tmp_path (started unless start=False); stop them all."""
    made: list[pmq.Cage] = []

    def make(name: str = "solo", data_dir: Path | None = None, *, start: bool = True,
             **kwargs: Any) -> pmq.Cage:
        cage = pmq.Cage(name, data_dir=data_dir if data_dir is not None else tmp_path / name,
                        **kwargs)
        made.append(cage)
        if start:
            cage.start()
        return cage

    yield make
    for cage in reversed(made):
        cage.stop()

