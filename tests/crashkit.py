"""What the SIGKILL crash tests of the cage and of the transport share, written once.

Why it exists: tests/test_cage_crash.py (one cage that calls itself) and
tests/test_transport_crash.py (cage a streaming calls to cage b) both start their workload as
child processes, SIGKILL them at seeded moments, read the fsynced per-call logs the children's
handlers leave, check the same promises about them and tally what they saw. Those pieces live
here, so the two suites start, kill, read and check in the same way and with the same words.

Owns:
- the parent's side: the seed (PMQ_CRASH_SEED), starting a workload with its stderr in a file,
  SIGKILLing it, reading its runs files (``Run``, ``read_runs``) and its producers' reports
  (``read_reports``), the checks both suites make, and the tally's printout;
- the child's side: ``report``, ``die`` and ``RunsLog``, the base of the exposed handler module
  that writes the runs file.

Must not: import pytest, conftest or the test modules: the workloads import this module too
(``spawn`` runs them as scripts, so tests/ is first on their sys.path, as it is on pytest's);
know a suite's kill schedule, its own checks or how many rounds it runs; decide pass or fail
in a child.

Formats:
- a runs file, one per life of the cage that runs the calls (O_APPEND, one write per line,
  fsynced): ``BEGIN LIFE CALL_ID ATTEMPT TAG`` before the handler's work and
  ``end LIFE CALL_ID ATTEMPT TAG`` after it, where BEGIN is the suite's word (``start`` for the
  cage, ``begin`` for the transport);
- a producer's reports (stdout, one ``os.write`` per line): ``try TAG`` before ``execute``,
  ``made TAG CALL_ID`` after it returned, ``xa-try TAG TAG ...`` before a transaction block,
  ``xa TAG=CALL_ID ...`` after it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import traceback
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pmq

# ---- the parent's side ------------------------------------------------------------------------


def crash_seed() -> int:
    """The seed of a suite's kill schedule: PMQ_CRASH_SEED if set, else a fresh random one."""
    return int(os.environ.get("PMQ_CRASH_SEED", random.SystemRandom().randrange(2**32)))


def spawn(workload: Path, args: list[str], stderr_path: Path, *,
          stdin: bool = False) -> subprocess.Popen[bytes]:
    """Start ``python WORKLOAD ARGS...``: stdout a pipe, stderr into `stderr_path`.

    Run as a script, the workload has tests/ first on its sys.path and imports this module.
    With `stdin`, the child's stdin is a pipe for commands; otherwise it inherits ours.
    """
    with open(stderr_path, "wb") as stderr:  # a file: a chatty child never blocks on a full pipe
        return subprocess.Popen([sys.executable, str(workload), *args],
                                stdin=subprocess.PIPE if stdin else None,
                                stdout=subprocess.PIPE, stderr=stderr)


def stderr_tail(path: Path) -> str:
    """The end of a child's stderr file, for a failure message."""
    return path.read_text(errors="replace")[-20_000:]


def sigkill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child if it still runs (the caller collects it)."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGKILL)


@dataclass
class Run:
    """One execution of a call, from a runs file."""

    life: int
    attempt: int
    tag: str
    ended: bool = False


def read_runs(files: list[Path], note: str, *, begin: str,
              copies: bool = False) -> dict[str, list[Run]]:
    """Call id -> its executions in the order they started, from each life's runs file in turn.

    `begin` is the word of the lines written before the handler's work. Unless `copies`, an end
    line must match exactly one run, still open; with `copies` (two copies of one call may run at
    once: the caller's checks say so) it ends the first open run that matches.

    A SIGKILL can cut a line short (a write that straddles a page is not atomic against a
    fatal signal), so a last line without its newline in a killed life's file is left out: that
    run is treated as if the kill came just before the write.
    """
    runs: dict[str, list[Run]] = defaultdict(list)
    for path in files:
        text = path.read_text() if path.exists() else ""
        lines = text.split("\n")
        if lines[-1]:
            assert path is not files[-1], f"{path.name} ends in a torn line; {note}"
            print(f"torn last line in {path.name}: {lines[-1]!r}")
        for line in lines[:-1]:
            kind, life, call_id, attempt, tag = line.split(" ")
            if kind == begin:
                runs[call_id].append(Run(int(life), int(attempt), tag))
                continue
            assert kind == "end", f"bad line {line!r}; {note}"
            alike = [r for r in runs[call_id]
                     if (r.life, r.attempt, r.tag) == (int(life), int(attempt), tag)]
            if copies:
                alike = [r for r in alike if not r.ended]
                assert alike, f"end without its {begin}: {line!r}; {note}"
            else:
                assert len(alike) == 1 and not alike[0].ended, (
                    f"end without its {begin}: {line!r}; {note}")
            alike[0].ended = True
    return runs


def read_reports(lives: Iterable[list[str]]) -> tuple[set[str], dict[str, str], list[list[str]]]:
    """From the report lines of a producer's lives: (tags tried, tag -> the call id execute
    returned, the transactions tried)."""
    tried: set[str] = set()
    made: dict[str, str] = {}
    groups: list[list[str]] = []
    for lines in lives:
        for line in lines:
            word, _, rest = line.partition(" ")
            if word == "try":
                tried.add(rest)
            elif word == "made":
                tag, call_id = rest.split(" ")
                made[tag] = call_id
            elif word == "xa-try":
                groups.append(rest.split(" "))
                tried.update(groups[-1])
            elif word == "xa":
                for item in rest.split(" "):
                    tag, call_id = item.split("=")
                    made[tag] = call_id
    return tried, made, groups


def ran_tags(runs: dict[str, list[Run]], note: str) -> dict[str, str]:
    """Tag -> the call id it ran under: a call ran as one tag, a tag under one call id only."""
    ids_of_tag: dict[str, set[str]] = defaultdict(set)
    for call_id, executions in runs.items():
        tags = {r.tag for r in executions}
        assert len(tags) == 1, f"call {call_id} ran as several tags {tags}; {note}"
        ids_of_tag[tags.pop()].add(call_id)
    for tag, call_ids in ids_of_tag.items():
        assert len(call_ids) == 1, f"{tag} was stored as several calls {call_ids}; {note}"
    return {tag: next(iter(ids)) for tag, ids in ids_of_tag.items()}


def check_reruns(call_id: str, executions: list[Run], note: str, tally: dict[str, int], *,
                 life: str = "life") -> None:
    """Each run of a call after the first is in a later life, with a higher attempt; count why.

    `life` names a life in the messages (``life``, ``b's life``).
    """
    for earlier, later in itertools.pairwise(executions):
        assert earlier.life < later.life, (
            f"{call_id} ran twice in {life} {later.life}: {executions}; {note}")
        assert earlier.attempt < later.attempt, (
            f"{call_id} ran again without a higher attempt: {executions}; {note}")
        tally["re-run after a kill inside the handler" if not earlier.ended
              else "re-run after its completion was lost"] += 1


def check_transactions(groups: list[list[str]], ran: dict[str, str], note: str,
                       tally: dict[str, int]) -> None:
    """A transaction's calls ran all or none; count the stored and the lost ones."""
    for group in groups:
        done = [tag for tag in group if tag in ran]
        assert not done or len(done) == len(group), (
            f"transaction {group} ran only {done}; {note}")
        tally["transactions stored" if done else "transactions lost in a kill"] += 1


def format_tally(tally: dict[str, int]) -> str:
    """``key: count, ...`` in key order, for the line a test prints at its end."""
    return ", ".join(f"{k}: {v}" for k, v in sorted(tally.items()))


# ---- the child's side -------------------------------------------------------------------------


def report(line: str) -> None:
    """One line to the parent, in one write (atomic on a pipe)."""
    os.write(1, (line + "\n").encode())


def die(message: str) -> None:
    """Print the current exception and exit at once: the parent sees a non-SIGKILL exit."""
    sys.stderr.write(message + "\n" + traceback.format_exc())
    sys.stderr.flush()
    os._exit(3)


class RunsLog:
    """Base of a workload's exposed module: its handlers write this life's runs file."""

    def __init__(self, path: str, life: int, seed: int) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.life = life
        self.rng = random.Random(seed)
        self.rng_lock = threading.Lock()

    def _line(self, kind: str, tag: str) -> str:
        """Append ``KIND LIFE CALL_ID ATTEMPT TAG`` for the running call, fsynced (a line the
        parent reads survives the SIGKILL that follows); return the call id."""
        info = pmq.current_call()
        assert info is not None
        os.write(self.fd, f"{kind} {self.life} {info.call_id} {info.attempt} {tag}\n".encode())
        os.fsync(self.fd)
        return info.call_id

    def _pick(self, choices: tuple[float, ...]) -> float:
        """A seeded choice, safe from several handler threads at once."""
        with self.rng_lock:
            return self.rng.choice(choices)
