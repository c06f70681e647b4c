"""``pmq demo`` (and ``make demo``): two cage processes, SIGKILLs in the middle, then a tally.

Cage "billing" makes queued calls ``accounts.credit(account, amount=..., tag=...)`` to cage
"ledger" (``execute.on("ledger_queue")``), in transactions and one by one; ledger's handler
appends ``call id, attempt, tag`` to a file and fsyncs it. While calls flow, this process (the
parent) SIGKILLs ledger and starts it again, then SIGKILLs billing and starts it again, waits
until everything has drained, reads the files and prints the tally: made, accepted, executed,
duplicates, dead letters, lost, throughput. Exit status 0 only when nothing was lost, nothing
ran that was never made, and every duplicate is the documented case (DESIGN.md section 2).

Owns: the demo's script, its two worker roles (this module run again with the hidden
``--role billing|ledger``), their line protocol, and the verdict. Must not: reach into pmq's
internals (workers use the public API only) or read the cages' data directories.

Files, one per process life (a SIGKILL may tear the last line of its own life's file only):
- ``billing-made-<life>.log``: ``tag call_id`` for every call whose ``execute`` returned (for a
  transaction: once its block returned), fsynced: what counts as *made*. A restarted billing
  counts these lines and makes the rest of the calls.
- ``ledger-runs-<life>.log``: ``call_id attempt tag time`` for every run of the handler, fsynced
  before the handler returns.
A tag names one call: ``<life>:x<n>:<i>/<size>`` (call i of transaction n) or ``<life>:s<t>.<n>``.

Worker protocol (stdout, one write per line): ``ready {json}``; ``progress [json]`` every 20 ms
(billing: calls made in all lives, and when this life began; ledger: handler runs in this life);
billing ``done`` once every call is made; ``drained {json}`` (dead letters) after
``cage.drain()``. The parent writes ``drain`` to ledger's stdin once billing has drained. A
worker whose stdin closes exits (its parent is gone).

Invariants checked (``_verdict``):
- lost = 0: every made call ran, under the call id ``execute`` returned;
- every call that ran was made, or was stored by a billing life that was killed before it could
  log it (its ``execute`` had not returned yet), and each tag ran under one call id only;
- a transaction ran all of its calls or none;
- a call ran more than once only when a ledger life was killed after the run (attempt and life
  both grow): the crash between a successful execution and its completion record;
- no dead letters on either cage.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import itertools
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pmq
from pmq._bench import (
    HOST,
    emit,
    free_port,
    fs_type,
    render_table,
    scratch_base,
    wait_port,
    watch_stdin,
)

DEFAULT_CALLS = 20_000
XA_CALLS = 200  # calls per transaction (fewer when --calls is small)
SINGLE_THREADS = 8  # billing threads making single calls
SINGLE_SHARE = 0.1  # of the calls, made one by one; the rest in transactions
LEDGER_WORKERS = 32  # threads running ledger's handlers
LEDGER_CONCURRENCY = 64  # calls of billing_queue running at once on ledger
LEDGER_KILL_AT = 0.3  # SIGKILL ledger once billing has made this share of the calls
BILLING_KILL_AT = 0.65  # SIGKILL billing once it has made this share of the calls
PROGRESS_S = 0.02  # how often a worker reports its progress
PRINT_EVERY_S = 2.0  # how often the parent prints progress while it waits
STEP_LIMIT_S = 120.0  # a step that takes longer than this is a hang: the demo fails
STOP_S = 15.0  # a drained worker that has not exited after this long is killed (and noted)
WORKER_LIMIT_S = 600.0  # a worker exits by itself after this long (faulthandler)

# ---------------------------------------------------------------------------------------------
# shared by both workers


class SyncedLog:
    """An append-only file whose ``write`` returns once the data is fsynced (group commit).

    Threads that write while an fsync is running are covered by the next one: one write and
    one fsync per batch, like pmq's own journal.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._cond = threading.Condition()
        self._buffer: list[bytes] = []
        self._queued = 0  # writes handed to this log
        self._durable = 0  # writes covered by a finished fsync
        self._syncing = False
        self._error: OSError | None = None

    def write(self, data: bytes) -> None:
        """Append ``data``; return once it is on stable storage.

        Raises:
            OSError: the write or the fsync failed (then every later write fails too).
        """
        with self._cond:
            self._buffer.append(data)
            self._queued += 1
            mine = self._queued
            while self._durable < mine:
                if self._error is not None:
                    raise self._error
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                batch, self._buffer, upto = self._buffer, [], self._queued
                self._cond.release()
                try:
                    self._flush(b"".join(batch))
                except OSError as exc:
                    self._error = exc
                finally:
                    self._cond.acquire()
                    self._syncing = False
                    self._cond.notify_all()
                if self._error is None:
                    self._durable = upto

    def _flush(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)  # survives a crash of the OS: the line is this run's evidence

    def close(self) -> None:
        os.close(self._fd)


def _start_worker(args: argparse.Namespace) -> dict[str, threading.Event]:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {args.role}[{args.life}] %(name)s: %(message)s")
    faulthandler.dump_traceback_later(WORKER_LIMIT_S, exit=True)
    commands = {"drain": threading.Event()}
    threading.Thread(target=watch_stdin, args=(commands,), daemon=True).start()
    return commands


def _waiting(cage: pmq.Cage) -> int:
    """Calls on this cage's disk not yet completed (queued to send, or to run)."""
    return sum(q["waiting"] + q["taken"] for q in cage.stats()["queues"].values())


def _dead(cage: pmq.Cage) -> list[list[str]]:
    return [[d.call_id, d.reason, d.detail[:200]] for d in cage.dead_letters()]


# ---------------------------------------------------------------------------------------------
# ledger: the target


class Accounts:
    """Ledger's exposed module: each run of ``credit`` leaves one fsynced line."""

    def __init__(self, log: SyncedLog) -> None:
        self._log = log
        self._lock = threading.Lock()
        self.runs = 0

    def credit(self, account: int, amount: int, tag: str) -> None:
        info = pmq.current_call()
        assert info is not None
        self._log.write(f"{info.call_id} {info.attempt} {tag} {time.time():.6f}\n".encode())
        with self._lock:
            self.runs += 1


def _ledger(args: argparse.Namespace) -> int:
    commands = _start_worker(args)
    work = Path(args.dir)
    log = SyncedLog(work / f"ledger-runs-{args.life}.log")
    accounts = Accounts(log)
    cage = pmq.Cage("ledger", data_dir=work / "ledger", listen=f"{HOST}:{args.port}",
                    workers=LEDGER_WORKERS, expose={"accounts": accounts},
                    queues={"billing_queue": {"concurrency": LEDGER_CONCURRENCY}})
    cage.start()
    emit("ready", {"waiting": _waiting(cage)})
    while not commands["drain"].wait(PROGRESS_S):
        emit("progress", [accounts.runs])
    cage.drain(timeout=STEP_LIMIT_S)
    emit("progress", [accounts.runs])
    emit("drained", {"dead": _dead(cage), "waiting": _waiting(cage)})
    cage.stop()
    log.close()
    return 0


# ---------------------------------------------------------------------------------------------
# billing: the source


class Budget:
    """How many calls are still to be made, claimed by the producer threads."""

    def __init__(self, calls: int) -> None:
        self._left = calls
        self._lock = threading.Lock()

    def take(self, most: int) -> int:
        with self._lock:
            got = min(most, self._left)
            self._left -= got
            return got


def _made_before(work: Path, life: int) -> int:
    """Calls the earlier billing lives logged as made (complete lines only)."""
    made = 0
    for earlier in range(1, life):
        path = work / f"billing-made-{earlier}.log"
        if path.exists():
            made += path.read_bytes().count(b"\n")
    return made


def _billing(args: argparse.Namespace) -> int:
    _start_worker(args)
    work = Path(args.dir)
    before = _made_before(work, args.life)
    log = SyncedLog(work / f"billing-made-{args.life}.log")
    cage = pmq.Cage("billing", data_dir=work / "billing", peers={"ledger": f"{HOST}:{args.port}"})
    cage.start()
    emit("ready", {"made_before": before, "waiting": _waiting(cage)})
    left = args.calls - before
    singles = Budget(round(left * SINGLE_SHARE))
    batches = Budget(left - round(left * SINGLE_SHARE))
    batch = max(10, min(XA_CALLS, args.calls // 100))
    made = [0] * (SINGLE_THREADS + 1)  # per thread: no lock needed
    life = args.life

    def transactions() -> None:
        rng = random.Random(life)
        n = 0
        while count := batches.take(batch):
            tags = [f"{life}:x{n}:{i}/{count}" for i in range(count)]
            with cage.transaction() as xa:
                target = xa.on("ledger_queue")
                for tag in tags:
                    target.accounts.credit(rng.randrange(1000), amount=rng.randrange(1, 100),
                                           tag=tag)
            log.write("".join(f"{t} {c}\n" for t, c in zip(tags, xa.call_ids,
                                                            strict=True)).encode())
            made[0] += count
            n += 1

    def single(thread: int) -> None:
        rng = random.Random(life * 100 + thread)
        n = 0
        execute = cage.execute
        while singles.take(1):
            tag = f"{life}:s{thread}.{n}"
            call_id = execute.on("ledger_queue").accounts.credit(
                rng.randrange(1000), amount=rng.randrange(1, 100), tag=tag)
            log.write(f"{tag} {call_id}\n".encode())
            made[thread] += 1
            n += 1

    threads = [threading.Thread(target=transactions, daemon=True)]
    threads += [threading.Thread(target=single, args=(t,), daemon=True)
                for t in range(1, SINGLE_THREADS + 1)]
    first = time.time()
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        time.sleep(PROGRESS_S)
        emit("progress", [before + sum(made), first])
    emit("progress", [before + sum(made), first])
    emit("done")
    cage.drain(timeout=STEP_LIMIT_S)
    emit("drained", {"dead": _dead(cage), "waiting": _waiting(cage)})
    cage.stop()
    log.close()
    return 0


# ---------------------------------------------------------------------------------------------
# the parent: spawn, kill, restart, wait


class DemoFailed(Exception):
    """The demo could not run to its end (a worker failed or hung): the message says where."""


@dataclass
class Life:
    """One worker process, and what it has reported so far."""

    role: str
    number: int
    proc: subprocess.Popen[str]
    stderr_path: Path
    ready: dict[str, Any] | None = None
    progress: list[Any] = field(default_factory=list)
    done: bool = False
    drained: dict[str, Any] | None = None
    eof: bool = False
    killed: bool = False

    def stderr_tail(self, lines: int = 20) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace").strip()
        except OSError:
            return ""
        if not text:
            return ""
        return f"\n--- {self.role} (life {self.number}) stderr ---\n" + "\n".join(
            text.splitlines()[-lines:])


class Demo:
    """The parent's script: start the cages, kill and restart them, wait for the drain."""

    def __init__(self, work: Path, calls: int, port: int) -> None:
        self.work = work
        self.calls = calls
        self.port = port
        self.t0 = time.monotonic()
        self.changed = threading.Condition()
        self.lives: dict[str, list[Life]] = {"ledger": [], "billing": []}
        self._printed = self.t0

    def say(self, text: str) -> None:
        elapsed = time.monotonic() - self.t0
        indent = "\n" + " " * 10
        print(f"[{elapsed:5.1f} s] " + indent.join(text.split("\n")), flush=True)
        self._printed = time.monotonic()

    # ---- workers -----------------------------------------------------------------------------

    def spawn(self, role: str) -> Life:
        number = len(self.lives[role]) + 1
        stderr_path = self.work / f"{role}-{number}.stderr"
        command = [sys.executable, "-m", "pmq._demo", "--role", role, "--dir", str(self.work),
                   "--port", str(self.port), "--life", str(number), "--calls", str(self.calls)]
        with open(stderr_path, "wb") as stderr:  # a file: a chatty worker never blocks on a pipe
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=stderr, text=True, bufsize=1)
        life = Life(role, number, proc, stderr_path)
        self.lives[role].append(life)
        threading.Thread(target=self._read, args=(life,), daemon=True).start()
        return life

    def _read(self, life: Life) -> None:
        assert life.proc.stdout is not None
        for line in life.proc.stdout:
            kind, _, rest = line.rstrip("\n").partition(" ")
            with self.changed:
                if kind == "ready":
                    life.ready = json.loads(rest)
                elif kind == "progress":
                    life.progress = json.loads(rest)
                elif kind == "done":
                    life.done = True
                elif kind == "drained":
                    life.drained = json.loads(rest)
                self.changed.notify_all()
        with self.changed:
            life.eof = True
            self.changed.notify_all()

    def current(self, role: str) -> Life:
        return self.lives[role][-1]

    def made(self) -> int:
        """Calls billing has made, in all its lives (its latest report)."""
        for life in reversed(self.lives["billing"]):
            if life.progress:
                return int(life.progress[0])
            if life.ready is not None:
                return int(life.ready["made_before"])
        return 0

    def ran(self) -> int:
        """Handler runs on ledger, in all its lives (repeats included)."""
        return sum(int(life.progress[0]) for life in self.lives["ledger"] if life.progress)

    def wait(self, what: str, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()``; print progress now and then.

        Raises:
            DemoFailed: a running worker exited, or ``what`` took over STEP_LIMIT_S.
        """
        deadline = time.monotonic() + STEP_LIMIT_S
        with self.changed:
            while not predicate():
                for role in ("ledger", "billing"):
                    life = self.current(role) if self.lives[role] else None
                    if life is not None and life.eof and not life.killed and life.drained is None:
                        life.proc.wait()
                        raise DemoFailed(f"{role} (life {life.number}) exited with status "
                                         f"{life.proc.returncode} while waiting for {what}"
                                         + life.stderr_tail())
                now = time.monotonic()
                if now > deadline:
                    raise DemoFailed(f"no {what} after {STEP_LIMIT_S:g} s" + "".join(
                        self.current(r).stderr_tail() for r in self.lives if self.lives[r]))
                if now - self._printed > PRINT_EVERY_S:
                    self.say(f"... billing has made {self.made():,} calls, ledger has run "
                             f"{self.ran():,}")
                self.changed.wait(0.1)

    def start(self, role: str) -> Life:
        """Start a life of ``role`` and wait until it is ready (ledger: its port accepts)."""
        life = self.spawn(role)
        self.wait(f"{role} ready", lambda: life.ready is not None)
        if role == "ledger":
            wait_port(self.port, STEP_LIMIT_S)
        return life

    def kill(self, life: Life) -> None:
        life.proc.kill()  # SIGKILL (TerminateProcess on Windows): no cleanup of any kind
        life.proc.wait()
        with self.changed:
            life.killed = True

    def stop_all(self) -> None:
        """Kill every worker still running (after a failure) and close the pipes."""
        for lives in self.lives.values():
            for life in lives:
                if life.proc.poll() is None:
                    self.kill(life)
                with contextlib.suppress(OSError):
                    if life.proc.stdin is not None:
                        life.proc.stdin.close()

    def send(self, life: Life, command: str) -> None:
        assert life.proc.stdin is not None
        life.proc.stdin.write(command + "\n")
        life.proc.stdin.flush()

    # ---- the script --------------------------------------------------------------------------

    def run(self) -> None:
        n = self.calls
        self.say(f"starting cage ledger: listens on {HOST}:{self.port}, exposes accounts.credit")
        ledger = self.start("ledger")
        self.say(f"ledger is up (pid {ledger.proc.pid})")
        self.say(f"starting cage billing: it makes {n:,} calls execute.on(\"ledger_queue\")"
                 f".accounts.credit(...):\n{1 - SINGLE_SHARE:.0%} in transactions, the rest one by "
                 f"one from {SINGLE_THREADS} threads")
        billing = self.start("billing")
        self.say(f"billing is up (pid {billing.proc.pid})")

        self.wait("calls flowing", lambda: billing.done or (
            self.made() >= n * LEDGER_KILL_AT and self.ran() >= n * LEDGER_KILL_AT / 10))
        self.say(f"billing has made {self.made():,} calls, ledger has run {self.ran():,}")
        self.kill(ledger)
        self.say(f"SIGKILL ledger (pid {ledger.proc.pid}) while its handlers run; billing goes on "
                 f"making calls:\nthe ones ledger has not acknowledged wait on billing's disk")
        ledger = self.spawn("ledger")
        self.say("starting ledger again on its data directory")
        self.wait("billing making calls", lambda: self.made() >= n * BILLING_KILL_AT
                  or billing.done)
        done, drained = billing.done, billing.drained is not None
        self.kill(billing)
        if drained:
            self.say(f"billing made and delivered all {n:,} calls before this demo could kill it; "
                     f"SIGKILL billing (pid {billing.proc.pid}) all the same")
        elif done:
            self.say(f"billing has made all {n:,} calls already: SIGKILL billing (pid "
                     f"{billing.proc.pid}) while it still delivers them")
        else:
            self.say(f"SIGKILL billing (pid {billing.proc.pid}) in the middle of making calls "
                     f"(~{self.made():,} made)")
        self.wait("ledger ready", lambda: ledger.ready is not None)
        wait_port(self.port, STEP_LIMIT_S)
        assert ledger.ready is not None
        self.say(f"ledger is up again (pid {ledger.proc.pid}): it found {ledger.ready['waiting']:,}"
                 f" accepted calls on its disk;\nthose that were running at the kill run again, "
                 f"one at a time, with current_call().attempt = 2")
        self.say("starting billing again on its data directory")
        billing = self.start("billing")
        assert billing.ready is not None
        before = billing.ready["made_before"]
        self.say(f"billing is up again (pid {billing.proc.pid}): its log says {before:,} calls "
                 f"were made;\n{billing.ready['waiting']:,} calls wait on its disk for ledger; "
                 f"it makes the other {n - before:,}")

        self.wait("billing done", lambda: billing.done)
        self.say(f"billing has made all {n:,} calls; waiting until ledger has accepted them "
                 f"(billing.drain())")
        self.wait("billing drained", lambda: billing.drained is not None)
        self.say(f"billing is drained: ledger acknowledged every call; ledger has run "
                 f"{self.ran():,} so far")
        self.send(ledger, "drain")
        self.wait("ledger drained", lambda: ledger.drained is not None)
        self.say("ledger is drained: every call it accepted has run")
        for life in (billing, ledger):
            try:
                life.proc.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:  # every call is accounted for: say so, go on
                self.say(f"note: {life.role} did not exit within {STOP_S:g} s of cage.stop(); "
                         f"killed it")
                life.proc.kill()  # not marked killed: its files were complete before the stop
                life.proc.wait()
                continue
            if life.proc.returncode != 0:
                raise DemoFailed(f"{life.role} exited with status {life.proc.returncode} after "
                                 f"draining" + life.stderr_tail())
        self.stop_all()


# ---------------------------------------------------------------------------------------------
# the tally


@dataclass
class Run:
    """One run of ledger's handler, from its runs file."""

    life: int
    call_id: str
    attempt: int
    tag: str
    at: float


def _lines(path: Path, killed: bool) -> list[str]:
    """The complete lines of a worker's file; a killed life's torn last line is left out."""
    text = path.read_text() if path.exists() else ""
    lines = text.split("\n")
    if lines[-1] and not killed:
        raise DemoFailed(f"{path.name} ends in a torn line, but that process was not killed")
    return lines[:-1]


@dataclass
class Tally:
    """What the files say (the table's rows), and what is wrong with it (``problems``)."""

    made: dict[str, str] = field(default_factory=dict)  # tag -> call id execute returned
    runs: dict[str, list[Run]] = field(default_factory=dict)  # call id -> its runs, in order
    problems: list[str] = field(default_factory=list)
    rows: list[tuple[str, str, str]] = field(default_factory=list)


def _problem(tally: Tally, what: str, examples: Sequence[object]) -> None:
    if examples:
        shown = ", ".join(map(str, list(examples)[:5]))
        tally.problems.append(f"{len(examples):,} {what} (e.g. {shown})")


def _verdict(demo: Demo) -> Tally:
    """Read every file, check the invariants of the module docstring, build the table."""
    tally = Tally()
    work, killed = demo.work, {r: {li.number for li in ls if li.killed}
                               for r, ls in demo.lives.items()}
    for life in demo.lives["billing"]:
        for line in _lines(work / f"billing-made-{life.number}.log", life.killed):
            tag, call_id = line.split(" ")
            tally.made[tag] = call_id
    runs: dict[str, list[Run]] = defaultdict(list)
    for life in demo.lives["ledger"]:
        for line in _lines(work / f"ledger-runs-{life.number}.log", life.killed):
            call_id, attempt, tag, at = line.split(" ")
            runs[call_id].append(Run(life.number, call_id, int(attempt), tag, float(at)))
    tally.runs = runs

    ids_of_tag: dict[str, set[str]] = defaultdict(set)
    for call_id, executions in runs.items():
        tags = {run.tag for run in executions}
        _problem(tally, "calls that ran with different tags", [call_id] if len(tags) > 1 else [])
        ids_of_tag[executions[0].tag].add(call_id)
    _problem(tally, "tags stored as several calls",
             [t for t, ids in ids_of_tag.items() if len(ids) > 1])
    ran = {tag: next(iter(ids)) for tag, ids in ids_of_tag.items()}

    lost = [tag for tag in tally.made if tag not in ran]
    _problem(tally, "made calls that never ran (LOST)", lost)
    _problem(tally, "calls that ran under another id than execute returned",
             [t for t, c in tally.made.items() if t in ran and ran[t] != c])
    unmade = [tag for tag in ran if tag not in tally.made]
    invented = [t for t in unmade if int(t.split(":")[0]) not in killed["billing"]]
    _problem(tally, "calls that ran but were never made", invented)

    groups: dict[str, set[str]] = defaultdict(set)
    for tag in ran:
        if ":x" in tag:
            groups[tag.rsplit(":", 1)[0] + "/" + tag.rsplit("/", 1)[1]].add(tag)
    _problem(tally, "transactions that ran only in part",
             [g for g, tags in groups.items() if len(tags) != int(g.rsplit("/", 1)[1])])

    unexplained = [call_id for call_id, executions in runs.items() if not all(
        earlier.life < later.life and earlier.attempt < later.attempt
        and earlier.life in killed["ledger"] for earlier, later in itertools.pairwise(executions))]
    _problem(tally, "calls that ran again without a kill of ledger in between", unexplained)

    dead = {role: demo.current(role).drained or {} for role in demo.lives}
    for role, report in dead.items():
        _problem(tally, f"dead letters on {role}", report.get("dead", []))

    executed = sum(len(e) for e in runs.values())
    duplicates = sum(1 for e in runs.values() if len(e) > 1)
    repeats = sum(1 for e in runs.values() for r in e if r.attempt > 1)
    in_xa = sum(1 for tag in tally.made if ":x" in tag)
    firsts = [li.progress[1] for li in demo.lives["billing"] if li.progress]
    last_run = max((r.at for e in runs.values() for r in e), default=0.0)
    window = last_run - min(firsts) if firsts and last_run else 0.0
    explained = "all explained by a kill, see below" if not unexplained else (
        f"{len(unexplained):,} NOT explained by a kill of ledger")
    tally.rows = [
        ("made", f"{len(tally.made):,}", f"execute returned, says billing's fsynced log "
         f"({in_xa:,} in transactions, {len(tally.made) - in_xa:,} single)"),
        ("accepted", f"{len(runs):,}", "distinct call ids that ran on ledger, of which"),
        ("  not in the log", f"{len(unmade) - len(invented):,}",
         "stored as billing was killed, before execute returned"),
        ("executed", f"{executed:,}", f"handler runs, repeats included ({repeats:,} with "
         f"attempt > 1)"),
        ("duplicates", f"{duplicates:,}", f"calls that ran twice: {explained}"),
        ("dead letters", f"{len(dead['billing'].get('dead', [])):,} / "
         f"{len(dead['ledger'].get('dead', [])):,}", "on billing / on ledger"),
        ("lost", f"{len(lost):,}", "made, never ran"),
        ("throughput", f"{len(runs) / window if window > 0 else 0:,.0f}/s",
         f"end to end: first call made to last run "
         f"in {window:.2f} s, kills included"),
    ]
    return tally


# ---------------------------------------------------------------------------------------------
# entry points


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pmq demo", description="Two cage processes, SIGKILLs while calls flow, then a "
        "tally that shows nothing was lost.")
    parser.add_argument("--calls", type=int, default=DEFAULT_CALLS,
                        help=f"how many calls billing makes (default {DEFAULT_CALLS:,})")
    parser.add_argument("--dir", default=None,
                        help="where to make the scratch directory (default: the temporary "
                             "directory, or /var/tmp when that is tmpfs)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--role", choices=("billing", "ledger"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--life", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.calls < 100:
        parser.error("--calls must be at least 100")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the demo (or, with the hidden ``--role``, one of its workers).

    Returns:
        0 when nothing was lost and every duplicate is explained, 1 when a check failed, 2 when
        the demo could not run.
    """
    args = _parse(argv)
    if args.role == "ledger":
        return _ledger(args)
    if args.role == "billing":
        return _billing(args)
    base = Path(args.dir) if args.dir else scratch_base()
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pmq-demo-", dir=base))
    print(f"pmq demo: cage billing makes {args.calls:,} queued calls to cage ledger, two "
          f"processes on {HOST}.\nledger's handler appends (call id, attempt) to a file and "
          f"fsyncs it. Both processes are SIGKILLed\nwhile calls flow and started again on their "
          f"data directories; then the files are counted.\n"
          f"scratch directory: {work} ({fs_type(work)})\n", flush=True)
    demo = Demo(work, args.calls, free_port())
    try:
        demo.run()
        tally = _verdict(demo)
    except (DemoFailed, OSError, subprocess.SubprocessError) as exc:
        print(f"\nthe demo could not run: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 2
    finally:
        demo.stop_all()
        if args.keep:
            print(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(render_table(["", "count", ""], tally.rows, "lrl"))
    print("\nA duplicate is a call whose handler ran, after which ledger was SIGKILLed before "
          "the\ncompletion of that run was on its disk (the kill fell inside the handler, or just "
          "after it):\npmq runs it again, and the handler sees current_call().attempt one higher "
          "(DESIGN.md section 2).\nEach duplicate above was checked to be that case: its earlier "
          "run was in a ledger life\nthat was killed, its later run in a later life with a higher "
          "attempt.")
    elapsed = time.monotonic() - demo.t0
    if tally.problems:
        print("\nFAIL:\n  " + "\n  ".join(tally.problems))
        return 1
    print(f"\nPASS: every one of the {len(tally.made):,} calls made ran, none was lost, every "
          f"duplicate is explained ({elapsed:.1f} s in all).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
