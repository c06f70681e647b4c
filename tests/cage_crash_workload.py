"""The child process of test_cage_crash.py: a cage that makes loopback calls until it is killed.

Owns: what the child does and the two line formats the parent reads. Must not: decide pass or
fail; the parent does that after it has SIGKILLed this process and drained the data directory.
``report``, ``die`` and the runs file's writer (``RunsLog``) come from tests/crashkit.py, shared
with transport_crash_workload.py.

Run as ``python cage_crash_workload.py DATA_DIR RUNS_FILE LIFE MODE SEED``:
- MODE ``work``: start the cage, then two producer threads make calls for ever: single calls,
  transactions of 2..6 calls, and "parent" calls whose handler queues a sub-step with
  ``pmq.execute.on("loopback_queue", id="step")``.
- MODE ``drain``: start the cage, ``drain()``, report what is left, stop cleanly.

Reports (stdout, one ``os.write`` per line, so lines from two threads never mix):
- ``ready`` once the cage has started;
- ``try TAG`` before ``execute`` is called, ``made TAG CALL_ID`` after it returned;
- ``xa-try TAG TAG ...`` before a transaction block, ``xa TAG=CALL_ID ...`` after it;
- (drain) ``drained OUTSTANDING DEAD``.

The handler appends to RUNS_FILE (this life's own file; O_APPEND, one write per line, fsynced)
a line ``start LIFE CALL_ID ATTEMPT TAG`` before its work and ``end LIFE CALL_ID ATTEMPT TAG``
after it.
A tag names one call the workload tried to make: ``L<life>-<thread>-<n>``, with a ``p`` at the
end for a parent call, and ``/step`` after that for its sub-step (made by the parent's handler).
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time

import pmq
from crashkit import RunsLog, die, report

#: Give up on our own after this long, in case the parent died without killing us.
MAX_LIFETIME_S = 120.0
PRODUCERS = 2
POLICY = {"loopback_queue": {"concurrency": 4, "max_crashes": 1_000_000,
                             "retry_initial": 0.01, "retry_max": 0.05}}


class Runs(RunsLog):
    """The exposed module: a handler that leaves fsynced start and end lines."""

    def run(self, tag: str) -> None:
        """A plain call: start line, some work, end line."""
        self._line("start", tag)
        time.sleep(self._pick((0.0, 0.0, 0.001, 0.005, 0.02)))
        self._line("end", tag)

    def parent(self, tag: str) -> None:
        """A call that queues a sub-step: retried, it must queue the step only once."""
        self._line("start", tag)
        pmq.execute.on("loopback_queue", id="step").runs.run(tag + "/step")
        time.sleep(self._pick((0.0, 0.002, 0.01)))
        self._line("end", tag)


def produce(cage: pmq.Cage, life: int, worker: int, seed: int) -> None:
    """Make calls for ever: singles, transactions and parents, reporting each as it returns."""
    rng = random.Random(seed * 100 + worker)
    n = 0
    try:
        while True:
            choice = rng.random()
            if choice < 0.25:
                tags = [f"L{life}-{worker}-{n + i}" for i in range(rng.randint(2, 6))]
                n += len(tags)
                report("xa-try " + " ".join(tags))
                pause = rng.choice((0.0, 0.0, 0.002, 0.01))  # widens the window for a kill
                with cage.transaction() as xa:
                    for i, tag in enumerate(tags):
                        xa.on("loopback_queue").runs.run(tag)
                        if i == 0:
                            time.sleep(pause)
                report("xa " + " ".join(f"{t}={i}" for t, i in zip(tags, xa.call_ids,
                                                                      strict=True)))
            else:
                method = "parent" if choice < 0.4 else "run"
                tag = f"L{life}-{worker}-{n}" + ("p" if method == "parent" else "")
                n += 1
                report(f"try {tag}")
                call_id = getattr(cage.execute.on("loopback_queue").runs, method)(tag)
                report(f"made {tag} {call_id}")
            if rng.random() < 0.3:
                time.sleep(rng.choice((0.001, 0.005, 0.02)))
    except BaseException:
        die(f"producer {worker} failed")


def main(argv: list[str]) -> None:
    """Start the cage on the directory named on the command line; work or drain."""
    data_dir, runs_file, life_text, mode, seed_text = argv
    life, seed = int(life_text), int(seed_text)
    cage = pmq.Cage("crashy", data_dir=data_dir, queues=POLICY, workers=4,
                    expose={"runs": Runs(runs_file, life, seed)})
    try:
        cage.start()
    except BaseException:
        die("starting the cage failed")
    report("ready")
    if mode == "drain":
        try:
            cage.drain(timeout=MAX_LIFETIME_S)
            assert cage.store is not None
            report(f"drained {cage.store.outstanding()} {len(cage.dead_letters())}")
            cage.stop()
        except BaseException:
            die("draining failed")
        return
    if mode != "work":
        raise SystemExit(f"unknown mode {mode!r}")
    threads = [threading.Thread(target=produce, args=(cage, life, w, seed), daemon=True)
               for w in range(PRODUCERS)]
    for thread in threads:
        thread.start()
    threads[0].join(MAX_LIFETIME_S)
    sys.stderr.write("workload ran out of time without being killed\n")
    os._exit(4)


if __name__ == "__main__":
    main(sys.argv[1:])
