"""The child process of test_cage_crash.py: a cage that makes loopback calls until it is killed.

Owns: what the child does and the two line formats the parent reads. Must not: decide pass or
fail; the parent does that after it has SIGKILLed this process and drained the data directory.

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
import traceback

import pmq

#: Give up on our own after this long, in case the parent died without killing us.
MAX_LIFETIME_S = 120.0
PRODUCERS = 2
POLICY = {"loopback_queue": {"concurrency": 4, "max_crashes": 1_000_000,
                             "retry_initial": 0.01, "retry_max": 0.05}}


def report(line: str) -> None:
    """One line to the parent, in one write (atomic on a pipe)."""
    os.write(1, (line + "\n").encode())


def die(message: str) -> None:
    """Print the current exception and exit at once: the parent sees a non-SIGKILL exit."""
    sys.stderr.write(message + "\n" + traceback.format_exc())
    sys.stderr.flush()
    os._exit(3)


class Runs:
    """The exposed module: a handler that leaves fsynced start and end lines."""

    def __init__(self, path: str, life: int, seed: int) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.life = life
        self.rng = random.Random(seed)
        self.rng_lock = threading.Lock()

    def _line(self, kind: str, tag: str) -> None:
        info = pmq.current_call()
        assert info is not None
        os.write(self.fd, f"{kind} {self.life} {info.call_id} {info.attempt} {tag}\n".encode())
        os.fsync(self.fd)

    def run(self, tag: str) -> None:
        """A plain call: start line, some work, end line."""
        self._line("start", tag)
        with self.rng_lock:
            work = self.rng.choice((0.0, 0.0, 0.001, 0.005, 0.02))
        time.sleep(work)
        self._line("end", tag)

    def parent(self, tag: str) -> None:
        """A call that queues a sub-step: retried, it must queue the step only once."""
        self._line("start", tag)
        pmq.execute.on("loopback_queue", id="step").runs.run(tag + "/step")
        with self.rng_lock:
            work = self.rng.choice((0.0, 0.002, 0.01))
        time.sleep(work)
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
