"""A million pending calls: memory per pending call, and the time a restart takes.

Owns: the backlog figures of docs/performance.md. Run: ``.venv/bin/python bench/backlog.py``
(``--calls N`` for another size). Calls go to the outbound queue of a peer that is never
reached, so they stay pending; RSS is read from /proc (Linux).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time

import pmq


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1_000_000)
    n = parser.parse_args().calls
    work = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".work")
    os.makedirs(work, exist_ok=True)
    directory = tempfile.mkdtemp(dir=work)
    options = {"peers": {"ledger": "127.0.0.1:9"},
               "queues": {"ledger_queue": {"max_pending": 2 * n}}}
    try:
        cage = pmq.Cage("backlog", data_dir=directory, **options)  # type: ignore[arg-type]
        cage.start()
        gc.collect()
        before = rss_bytes()
        started = time.perf_counter()
        for _ in range(n // 1000):
            with cage.transaction() as xa:
                for _ in range(1000):
                    xa.on("ledger_queue").accounts.credit(12345, amount=10, memo="x" * 40)
        made = time.perf_counter() - started
        gc.collect()
        print(f"{n:,} pending calls made in {made:.1f} s; RSS +{(rss_bytes() - before) / n:.0f} "
              f"bytes per pending call (payload cache included)")
        cage.stop()
        size = sum(os.path.getsize(os.path.join(root, name))
                   for root, _, names in os.walk(directory) for name in names)
        print(f"data directory: {size / 1e6:.0f} MB")
        gc.collect()
        before = rss_bytes()
        started = time.perf_counter()
        cage = pmq.Cage("backlog", data_dir=directory, **options)  # type: ignore[arg-type]
        cage.start()
        took = time.perf_counter() - started
        gc.collect()
        pending = cage.store.pending("ledger_queue", outbound=True)  # type: ignore[union-attr]
        print(f"restart with {pending:,} pending: {took:.2f} s; RSS "
              f"+{(rss_bytes() - before) / n:.0f} bytes per pending call")
        cage.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
