"""Smoke test of an installed pmq: the compiled journal imports, writes, syncs and replays.

It is the cibuildwheel test-command (``python tests/test_wheel.py``, pyzmq tools/test_wheel.py),
so it must run as a plain script with nothing but the wheel installed, and under pytest too.
"""

from __future__ import annotations

import importlib.machinery
import sys
import tempfile
from pathlib import Path


def test_compiled_journal_round_trips_records_through_a_reopen() -> None:
    """pmq._journal is the compiled extension, and what it syncs replays after a reopen."""
    from pmq import _journal
    from pmq._journal import Journal

    module_file = Path(_journal.__file__ or "")
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    assert module_file.name.endswith(suffixes), f"pmq._journal is not compiled: {module_file}"
    source_tree = Path(__file__).resolve().parents[1] / "src"
    assert source_tree not in module_file.resolve().parents, (
        f"imported from the checkout: {module_file}"
    )

    payloads = [b"", b"wheel", bytes(range(256)) * 40]
    with tempfile.TemporaryDirectory(prefix="pmq-wheel-") as directory:
        with Journal(directory, segment_bytes=64 * 1024) as journal:
            first = journal.append(payloads[0])
            last = journal.append_many(payloads[1:])
            journal.sync(last)
            assert (first, last) == (1, 3)
            assert journal.durable_seq == 3
        with Journal(directory, segment_bytes=64 * 1024) as journal:
            assert list(journal.replay()) == list(enumerate(payloads, start=1))
            assert journal.next_seq == 4


if __name__ == "__main__":
    test_compiled_journal_round_trips_records_through_a_reopen()
    print(f"pmq wheel smoke test passed on Python {sys.version.split()[0]}")
