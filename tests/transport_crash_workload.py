"""The child process of test_transport_crash.py: cage "a" streams calls to cage "b" over TCP.

Owns: what the two cages do and the line formats the parent reads. Must not: decide pass or
fail; the parent does that after it has SIGKILLed these processes and drained both cages.
``report``, ``die`` and the runs file's writer (``RunsLog``) come from tests/crashkit.py, shared
with cage_crash_workload.py.

Run as ``python transport_crash_workload.py ROLE DATA_DIR PORT LIFE SEED [RUNS_FILE]``:
- ROLE ``a``: cage "a" with the peer "b" at 127.0.0.1:PORT; two producer threads make queued
  calls ``execute.on("b_queue").sink.put(tag)`` until told to drain: single calls and
  transactions of 2 to 200 calls, mixed.
- ROLE ``b``: cage "b" listening on 127.0.0.1:PORT, exposing ``sink``; its handler
  ``Sink.put(tag)`` appends fsynced ``begin``/``end`` lines to RUNS_FILE (this life's own file).

Commands, one per line on stdin: ``pause`` and ``resume`` (a: the producers wait, or go on;
the parent keeps a from running far ahead of b's handlers), ``drain`` (a: stop the producers;
both: ``cage.drain()`` and report what is left), ``stop`` (``cage.stop()``, report ``stopped``,
exit 0). End of file on stdin means the parent is gone: exit at once, so no child outlives its
test.

Reports (stdout, one ``os.write`` per line, so lines from two threads never mix; a line written
before a SIGKILL reaches the parent, the pipe keeps it):
- ``ready`` once the cage has started;
- a: ``try TAG`` before ``execute``, ``made TAG CALL_ID`` after it returned;
  ``xa-try TAG TAG ...`` before a transaction block, ``xa TAG=CALL_ID ...`` after it returned;
- b: ``begin CALL_ID`` when a handler starts (the parent times kills by it);
- ``drained OUTSTANDING DEAD`` after ``drain``; ``stopped`` after ``stop``.

RUNS_FILE lines (O_APPEND, one write per line, fsynced): ``begin LIFE CALL_ID ATTEMPT TAG``
before the handler's work and ``end LIFE CALL_ID ATTEMPT TAG`` after it. CALL_ID is
``pmq.current_call().call_id``: on b the id that ``execute`` returned on a (it travels with the
call). A tag names one call a producer tried to make, ``A<life>-<thread>-<n>``: unique across
lives, so across the whole test.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time

import pmq
from crashkit import RunsLog, die, report

PRODUCERS = 2
#: How long a drain may take before the child gives up and says what is left (only a limit on a
#: hang, shorter than the parent's).
DRAIN_LIMIT_S = 120.0
#: b runs a's calls four at a time, and never parks a call however often a kill hits it.
B_POLICY = {"a_queue": {"concurrency": 4, "max_crashes": 1_000_000,
                        "retry_initial": 0.01, "retry_max": 0.05}}
#: Sizes of a's transactions: mostly small, now and then 200 calls stored with one fsync.
XA_SIZES = (2, 2, 3, 5, 8, 20, 50, 200)
#: Small segments: the journals roll now and then under the kills, and the parent's scans of b's
#: journal read what was written, not a 64 MiB preallocated file.
SEGMENT_BYTES = 1 << 20
#: a sleeps this long per call it made (times 0.5..1.5), about 1,200 calls a second from both
#: producers: b, whose handlers fsync twice each, keeps up and its backlog stays short.
PACE_S = 0.0016


class Sink(RunsLog):
    """b's exposed module: a handler that leaves fsynced begin and end lines around its work."""

    def put(self, tag: str) -> None:
        """Begin line, some work, end line."""
        report(f"begin {self._line('begin', tag)}")
        work = self._pick((0.0, 0.0, 0.0, 0.0005, 0.002))
        if work:
            time.sleep(work)
        self._line("end", tag)


def produce(cage: pmq.Cage, life: int, worker: int, seed: int, stop: threading.Event,
            going: threading.Event) -> None:
    """Make calls to b until `stop` is set (and while `going` is), reporting each as it returns."""
    rng = random.Random(seed * 100 + worker)
    n = 0
    try:
        while going.wait() and not stop.is_set():
            if rng.random() < 0.35:
                tags = [f"A{life}-{worker}-{n + i}" for i in range(rng.choice(XA_SIZES))]
                n += len(tags)
                report("xa-try " + " ".join(tags))
                with cage.transaction() as xa:
                    for tag in tags:
                        xa.on("b_queue").sink.put(tag)
                report("xa " + " ".join(f"{t}={i}" for t, i in zip(tags, xa.call_ids,
                                                                      strict=True)))
            else:
                tags = [f"A{life}-{worker}-{n}"]
                tag = tags[0]
                n += 1
                report(f"try {tag}")
                call_id = cage.execute.on("b_queue").sink.put(tag)
                report(f"made {tag} {call_id}")
            time.sleep(PACE_S * len(tags) * rng.uniform(0.5, 1.5))
    except BaseException:
        die(f"producer {worker} failed")


def main(argv: list[str]) -> None:
    """Start cage a or b as the command line says, then obey the parent's commands."""
    role, data_dir, port, life_text, seed_text, *rest = argv
    life, seed = int(life_text), int(seed_text)
    if role == "a":
        cage = pmq.Cage("a", data_dir=data_dir, peers={"b": f"127.0.0.1:{port}"}, workers=2,
                         segment_bytes=SEGMENT_BYTES)
    elif role == "b":
        cage = pmq.Cage("b", data_dir=data_dir, listen=f"127.0.0.1:{port}", queues=B_POLICY,
                        workers=4, segment_bytes=SEGMENT_BYTES,
                        expose={"sink": Sink(rest[0], life, seed)})
    else:
        raise SystemExit(f"unknown role {role!r}")
    try:
        cage.start()
    except BaseException:
        die(f"starting cage {role} failed")
    report("ready")
    stop, going = threading.Event(), threading.Event()
    going.set()
    producers = [threading.Thread(target=produce, args=(cage, life, w, seed, stop, going),
                                  daemon=True)
                 for w in range(PRODUCERS if role == "a" else 0)]
    for thread in producers:
        thread.start()
    for raw in sys.stdin:
        command = raw.strip()
        try:
            if command == "pause":
                going.clear()
            elif command == "resume":
                going.set()
            elif command == "drain":
                stop.set()
                going.set()
                for thread in producers:
                    thread.join()
                cage.drain(timeout=DRAIN_LIMIT_S)
                assert cage.store is not None
                report(f"drained {cage.store.outstanding()} {len(cage.dead_letters())}")
            elif command == "stop":
                cage.stop()
                report("stopped")
                return
            else:
                raise ValueError(f"unknown command {command!r}")
        except BaseException:
            die(f"cage {role}: {command} failed")
    os._exit(5)  # stdin closed: the parent is gone


if __name__ == "__main__":
    main(sys.argv[1:])
