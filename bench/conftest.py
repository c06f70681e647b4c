"""Fixtures of the pytest-benchmark suite in bench/ (not part of ``make test``, which runs tests/).

Owns: the scratch directory of a benchmark session (on the real disk, under bench/.work) and the
number of rounds each ``benchmark.pedantic`` call makes. Must not: define anything tests/ relies on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import _benchutil as bu


@pytest.fixture(scope="session")
def bench_base() -> Iterator[Path]:
    """A scratch directory for the whole session, on the same file system as the repository."""
    base = bu.make_work_dir(None, "pytest-bench-")
    yield base
    bu.remove_tree(base)


@pytest.fixture
def rounds(request: pytest.FixtureRequest) -> int:
    """Rounds per benchmark: pytest-benchmark's ``--benchmark-min-rounds`` (default 5).

    ``benchmark.pedantic`` ignores the calibration options, so this is how the command line
    controls how long the suite takes.
    """
    try:
        value = request.config.getoption("benchmark_min_rounds")
    except ValueError:  # pytest-benchmark not loaded
        value = None
    return max(1, int(value or 5))


def pytest_benchmark_update_machine_info(
    config: pytest.Config, machine_info: dict[str, object]
) -> None:
    """Add the facts bench/ records (file system of the journals, CPU, versions) to the JSON."""
    machine_info["pmq"] = bu.machine_info(
        bu.DEFAULT_WORK_BASE if bu.DEFAULT_WORK_BASE.exists() else bu.BENCH_DIR
    )
