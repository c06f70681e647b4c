"""The child process of test_journal_crash.py: producers that append, sync and report, until killed.

Owns: the workload's payload format (``make_payload`` / ``parse_payload``, also imported by the
parent to check what it recovers) and the acknowledgement reports. Must not: decide anything about
pass or fail; the parent does that after it has SIGKILLed this process.

Run as ``python crash_workload.py DIR LIFE MODE WORKERS SEGMENT_BYTES SEED``:
- MODE ``threads``: WORKERS threads, each looping append (or append_many) → sync(seq) → report.
- MODE ``asyncio``: WORKERS coroutines, each looping append → ``await sync_async(seq)`` → report.

Invariants the parent relies on:
- A worker appends unit u+1 only after the sync covering unit u returned. A *unit* is one
  ``append`` or one ``append_many`` batch of k payloads.
- A report is written (one ``os.write`` of REPORT.size bytes to stdout, atomic on a pipe) only
  after the sync covering its unit returned, so every reported unit was acknowledged durable.
- Every payload is ``make_payload(life, worker, unit, k, j)``: the parent can recompute it, so
  a recovered payload that the workload never made is detected.
- The first report of a process is READY (seq 0) once the journal is open.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import struct
import sys
import threading
import traceback

#: One acknowledgement: last seq of the unit, worker, unit number, records in the unit.
REPORT = struct.Struct("<QIII")
READY_WORKER = 0xFFFFFFFF
#: Give up on our own after this long, in case the parent died without killing us.
MAX_LIFETIME_S = 120.0
_BIG_PAD = 16 * 1024


def make_payload(life: int, worker: int, unit: int, k: int, j: int) -> bytes:
    """The j-th payload of a unit of k records: a header naming it, then padding derived from it.

    Single records (k == 1) are sometimes large (16..48 KiB) so frames land near segment ends;
    records of a batch stay small so a batch always fits in one frame.
    """
    head = b"%d:%d:%d:%d:%d|" % (life, worker, unit, k, j)
    digest = hashlib.blake2b(head, digest_size=32).digest()
    h = int.from_bytes(digest[:4], "little")
    size = h % 1500
    if k == 1 and h % 29 == 0:
        size = _BIG_PAD + h % (2 * _BIG_PAD)
    return head + (digest * (size // len(digest) + 1))[:size]


def parse_payload(payload: bytes) -> tuple[int, int, int, int, int]:
    """(life, worker, unit, k, j) of a workload payload; ValueError if it is not one exactly."""
    head, sep, _ = payload.partition(b"|")
    if not sep:
        raise ValueError(f"payload has no header: {payload[:40]!r}")
    fields = head.split(b":")
    if len(fields) != 5:
        raise ValueError(f"payload header has {len(fields)} fields: {head[:40]!r}")
    life, worker, unit, k, j = (int(f) for f in fields)
    if not 0 <= j < k or make_payload(life, worker, unit, k, j) != payload:
        raise ValueError(f"payload does not match its header {head[:40]!r}")
    return life, worker, unit, k, j


def unit_size(rng: random.Random) -> int:
    """How many records the next unit has: mostly 1, sometimes a batch of 2..24."""
    return rng.randint(2, 24) if rng.random() < 0.2 else 1


def report(seq: int, worker: int, unit: int, k: int) -> None:
    """Tell the parent (one atomic pipe write) that this unit is durable."""
    os.write(1, REPORT.pack(seq, worker, unit, k))


def die(message: str) -> None:
    """Print the current exception and exit at once: the parent sees a non-SIGKILL exit."""
    sys.stderr.write(message + "\n" + traceback.format_exc())
    sys.stderr.flush()
    os._exit(3)


def append_unit(journal: object, life: int, worker: int, unit: int, k: int) -> int:
    """Append one unit; return the seq of its last record."""
    payloads = [make_payload(life, worker, unit, k, j) for j in range(k)]
    if k == 1:
        return journal.append(payloads[0])  # type: ignore[attr-defined,no-any-return]
    return journal.append_many(payloads)  # type: ignore[attr-defined,no-any-return]


def run_threads(journal: object, life: int, workers: int, seed: int) -> None:
    """WORKERS threads, each looping append → sync → report."""
    start = threading.Barrier(workers + 1)

    def work(worker: int) -> None:
        rng = random.Random(seed * 1000 + worker)
        try:
            start.wait()
            unit = 0
            while True:
                k = unit_size(rng)
                seq = append_unit(journal, life, worker, unit, k)
                journal.sync(seq)  # type: ignore[attr-defined]
                report(seq, worker, unit, k)
                unit += 1
        except BaseException:
            die(f"worker {worker} failed")

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(workers)]
    for thread in threads:
        thread.start()
    start.wait()
    threads[0].join(MAX_LIFETIME_S)


def run_asyncio(journal: object, life: int, workers: int, seed: int) -> None:
    """WORKERS coroutines, each looping append → await sync_async → report."""

    async def work(worker: int) -> None:
        rng = random.Random(seed * 1000 + worker)
        unit = 0
        while True:
            k = unit_size(rng)
            seq = append_unit(journal, life, worker, unit, k)
            await journal.sync_async(seq)  # type: ignore[attr-defined]
            report(seq, worker, unit, k)
            unit += 1

    async def main() -> None:
        tasks = [asyncio.ensure_future(work(w)) for w in range(workers)]
        done, _ = await asyncio.wait(
            tasks, timeout=MAX_LIFETIME_S, return_when=asyncio.FIRST_EXCEPTION
        )
        for task in done:
            task.result()

    try:
        asyncio.run(main())
    except BaseException:
        die("asyncio workload failed")


def main(argv: list[str]) -> None:
    """Open the journal named on the command line, report READY, run the producers."""
    directory, life, mode, workers, segment_bytes, seed = argv
    from pmq._journal import Journal

    try:
        journal = Journal(directory, segment_bytes=int(segment_bytes), durability="always")
    except BaseException:
        die("opening the journal failed")
    report(0, READY_WORKER, 0, 0)
    if mode == "threads":
        run_threads(journal, int(life), int(workers), int(seed))
    elif mode == "asyncio":
        run_asyncio(journal, int(life), int(workers), int(seed))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    sys.stderr.write("workload ran out of time without being killed\n")
    os._exit(4)


if __name__ == "__main__":
    main(sys.argv[1:])
