"""Process crashes between two cages: a streams calls to b over TCP; SIGKILL a, b or both.

Each test runs tests/transport_crash_workload.py as two processes on a fresh pair of data
directories: cage "b" listening on a fixed free port, cage "a" with b as its peer, streaming
queued calls ``execute.on("b_queue").sink.put(tag)`` (single calls and transactions of 2 to
200 calls). Every round starts whichever cage is down (b first), then SIGKILLs a, b or both at a
seeded random moment, and the next round restarts them on the same directories. The moments:
- early: while the processes import, recover their journals, listen, connect and shake hands;
- after a's n-th acknowledged call of the round: while a makes calls and its batches are in
  flight, while b stores them, while a settles b's acknowledgements;
- after b's n-th handler start of the round: while b's handlers run and their completions are
  being written (b runs a backlog while a keeps sending);
- (Linux) just after b wrote the n-th journal frame that stores a batch of a's calls: b is
  SIGSTOPped at each write to its journal (inotify) until the new frames hold its link's new
  high-water mark, so the kill lands between b storing a batch and acknowledging it: a window
  one fsync long, which decides whether a sends the batch again (and b must drop it);
plus, but for the last, a short random delay (none, up to 2 ms, up to 20 ms). With both victims
the second kill follows the first after none, up to 3 ms or up to 50 ms. a paces itself, and the
test pauses it while it is MAX_LEAD calls ahead of b's handlers, so b's backlog stays short on a
slow disk too. After the last round a stops making calls and drains (b acknowledged all it
stored), b drains (it ran all it accepted), b is SIGKILLed once more and started again to drain
and stop cleanly.

b's handler leaves fsynced ``begin``/``end`` lines naming b's life, the call id (the id a's
``execute`` returned: it travels with the call), the attempt and the tag; a reports each call
before ``execute`` and after it returned, each transaction before and after its block, on its
stdout (a line written before a SIGKILL still reaches the test through the pipe). After every
death of b (the last one after the drain) the test reads b's journal with the independent
reader (pmq._format) and notes every call from a that it holds, and in which order.

Checked at the end, over all rounds (DESIGN.md §2, §5):
- every call whose ``execute`` returned, and every call of a transaction whose block returned,
  ran on b to its end, under the id a returned; a transaction's calls ran all or none;
- nothing ran that a never tried, and a tag ran under one call id only;
- accepted exactly once: b's journal never holds two calls with the same source call id, and
  a call's runs have strictly increasing attempts (a second acceptance would start again at
  attempt 1), each in a later life of b than the one before (b was SIGKILLed in between). The
  earlier run either never ended (the kill fell inside the handler) or ended without its
  completion reaching the disk (the documented window, docs/cage.md); both are counted;
- order: b accepted a's calls in the order a made them (a's keys rise with b's journal seqs);
- every call b accepted ran, and the drains leave nothing pending and no dead letter on either
  cage.

The seed is printed with every test (pytest shows it with a failure) and named in every
assertion; set PMQ_CRASH_SEED to run the same kill schedule again (thread timing still differs).
Each child's stderr is kept beside its data directories under pytest's tmp_path. Starting and
killing the children, reading b's runs files and the checks shared with test_cage_crash.py are in
tests/crashkit.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest

import crashkit
from conftest import TORTURE, rounds
from crashkit import Run
from pmq._codec import unpack_arguments
from pmq._format import read_journal

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")

WORKLOAD = Path(__file__).with_name("transport_crash_workload.py")
SEED = crashkit.crash_seed()
#: How long to wait for a child to get going, make progress or drain: only a limit on a hang.
LIMIT_S = 180.0
#: Rounds of kills: 10 in ``make test``; 300 in ``make torture``, in parts of PART_ROUNDS rounds,
#: each part on fresh directories (so that no single test runs for many minutes).
ROUNDS = rounds(10, 300)
PART_ROUNDS = 30
#: How many calls a streams per round, roughly: ~10,000 calls in ``make test``, ~100,000
#: per torture part.
ROUND_CALLS = rounds(1500, 6000)
#: a is paused while it is this many calls ahead of b's handlers, and goes on at half of it: b's
#: backlog, hence each drain, stays short however slow b's handlers (two fsyncs each) are.
MAX_LEAD = 2000
#: Ports outside the kernel's ephemeral range: a's connection to a port nobody listens on must
#: never be given that very port as its own (a TCP self-connect would hold b's port).
PORTS = range(20_000, 30_000)
#: The start of the CALL record of a call accepted from another cage: a msgpack array of 12
#: items whose first is 1 (pmq/_calls.py, K_CALL).
_ACCEPTED_CALL = b"\x9c\x01"
#: The start of the record of the new state of a's link to b (a msgpack array of 6 items: 8, the
#: source "a", its 16-byte journal id, ...; pmq/_links.py K_LINK): b appends one in the frame of
#: every batch it stores.
_LINK_FROM_A = b"\x96\x08\xa1a\xc4\x10"
IN_MODIFY = 0x2  # <sys/inotify.h>
_INOTIFY_EVENT = struct.Struct("iIII")


@dataclass
class Life:
    """One child process: what it reported so far, and how it ended."""

    role: str  # "a" or "b"
    number: int
    process: subprocess.Popen[bytes]
    stderr_path: Path
    lines: list[str] = field(default_factory=list)
    made: int = 0  # a: calls acknowledged ("made" lines and the calls of "xa" lines)
    begins: int = 0  # b: handlers started
    eof: bool = False
    changed: threading.Condition = field(default_factory=threading.Condition)
    reader: threading.Thread | None = None
    returncode: int | None = None
    #: called by the reader with (calls acknowledged, handlers started) since the last call
    progressed: Callable[[int, int], None] = lambda made, begins: None
    stdin_lock: threading.Lock = field(default_factory=threading.Lock)

    def _read(self) -> None:
        """Collect report lines until the child closes stdout (it died or finished)."""
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode().rstrip("\n")
            made = begins = 0
            if line.startswith("begin "):
                begins = 1
            elif line.startswith("made "):
                made = 1
            elif line.startswith("xa "):
                made = line.count("=")
            with self.changed:
                self.lines.append(line)
                self.made += made
                self.begins += begins
                self.changed.notify_all()
            if made or begins:
                self.progressed(made, begins)
        with self.changed:
            self.eof = True
            self.changed.notify_all()

    def stderr(self) -> str:
        return crashkit.stderr_tail(self.stderr_path)

    def wait(self, predicate: Callable[[Life], bool], what: str, note: str) -> None:
        """Wait until `predicate(self)` holds; fail if the child died first or never gets there."""
        with self.changed:
            ok = self.changed.wait_for(lambda: predicate(self) or self.eof, LIMIT_S)
            if ok and predicate(self):
                return
        if self.eof:
            self.process.wait(LIMIT_S)
        raise AssertionError(
            f"{self.role}{self.number}: {what}: "
            f"{'it exited with ' + str(self.process.returncode) if self.eof else 'hung'} "
            f"(last lines {self.lines[-3:]}); {note}:\n{self.stderr()}")

    def command(self, text: str) -> None:
        assert self.process.stdin is not None
        with self.stdin_lock:  # the main thread and the pair's governor both write
            self.process.stdin.write((text + "\n").encode())
            self.process.stdin.flush()

    def kill(self) -> None:
        """SIGKILL the child (if it still runs) and collect it."""
        crashkit.sigkill(self.process)
        self.finish()

    def finish(self) -> None:
        """Collect a child that is exiting, with everything it reported."""
        self.returncode = self.process.wait(LIMIT_S)
        if self.reader is not None:
            self.reader.join(LIMIT_S)
        with self.stdin_lock, contextlib.suppress(OSError):  # a dead child's: broken pipe
            if self.process.stdin is not None:
                self.process.stdin.close()
        if self.process.stdout is not None:
            self.process.stdout.close()


@dataclass
class Pair:
    """The two cages of one test: their directories, port, lives and what b's journal held."""

    root: Path
    port: int
    rng: random.Random
    note: str
    a: Life | None = None
    b: Life | None = None
    lives: dict[str, list[Life]] = field(default_factory=lambda: {"a": [], "b": []})
    #: b's journal seq -> (source call id, tag) of every call from a that b's journal held
    accepted: dict[int, tuple[str, str]] = field(default_factory=dict)
    tally: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    history: list[str] = field(default_factory=list)  # the kills, for the failure report
    lead: int = 0  # calls a acknowledged beyond the handler runs b started (roughly b's backlog)
    paused: bool = False  # a was told to pause
    draining: bool = False  # the governor stays out of the drain
    governor: threading.Lock = field(default_factory=threading.Lock)

    def runs_file(self, number: int) -> Path:
        return self.root / f"runs-b{number}.log"

    def start(self, role: str) -> Life:
        """Start the next life of cage `role` on its directory."""
        number = len(self.lives[role]) + 1
        stderr_path = self.root / f"{role}{number}.stderr"
        args = [role, str(self.root / role), str(self.port), str(number),
                str(self.rng.randrange(2**31))]
        if role == "b":
            args.append(str(self.runs_file(number)))
        process = crashkit.spawn(WORKLOAD, args, stderr_path, stdin=True)
        life = Life(role, number, process, stderr_path, progressed=self.govern)
        with self.governor:
            self.lives[role].append(life)
            setattr(self, role, life)
            if role == "a":
                self.paused = False  # a new life starts making calls
        life.reader = threading.Thread(target=life._read, daemon=True)
        life.reader.start()
        self.govern(0, 0)
        return life

    def govern(self, made: int, begins: int) -> None:
        """Count progress; pause a while it is MAX_LEAD calls ahead of b, resume it at half."""
        with self.governor:
            self.lead += made - begins  # re-runs on b make it smaller: no harm
            if self.a is None or self.draining:
                return
            if self.lead > MAX_LEAD and not self.paused:
                self.paused, command = True, "pause"
            elif self.lead < MAX_LEAD // 2 and self.paused:
                self.paused, command = False, "resume"
            else:
                return
            self.tally[f"a told to {command}"] += 1
            with contextlib.suppress(OSError, ValueError):  # a was killed (closed stdin)
                self.a.command(command)

    def kill(self, role: str) -> None:
        """SIGKILL the running life of `role`; it must not have died by itself before."""
        life = getattr(self, role)
        assert life is not None
        life.kill()
        with self.governor:
            setattr(self, role, None)
        assert life.returncode == -signal.SIGKILL, (
            f"{role}{life.number} exited by itself ({life.returncode}); {self.note}:\n"
            f"{life.stderr()}")
        if role == "b":
            self.scan_b()

    def check_running(self) -> None:
        """Both cages that should run still do (a child that died by itself is a failure)."""
        for life in (self.a, self.b):
            if life is not None and life.process.poll() is not None:
                life.finish()
                raise AssertionError(f"{life.role}{life.number} exited by itself "
                                     f"({life.returncode}); {self.note}:\n{life.stderr()}")

    def scan_b(self) -> None:
        """Note every call from a that b's journal holds (b is not running: nothing writes).

        Records below the journal's floor are no longer there, so each scan sees what b kept;
        b's lives in this test are short, so its floor rarely moves, and the union of the
        scans after every death of b covers (nearly) every call it ever accepted.
        """
        directory = self.root / "b" / "journal"
        if not directory.is_dir():
            return  # killed before it made its journal
        report = read_journal(directory)
        self.tally["journal scans of b"] += 1
        for seq, payload in report.records:
            if not payload.startswith(_ACCEPTED_CALL):
                continue
            record = msgpack.unpackb(payload, raw=False)
            if record[1] != seq or record[10] != "a":
                continue  # a copy moved forward by relocation: its original was seen
            tag = unpack_arguments(record[7])[0][0]
            seen = self.accepted.setdefault(seq, (record[11], tag))
            assert seen == (record[11], tag), (
                f"b's journal seq {seq} held {seen}, later {record[11]} {tag}; {self.note}")


def free_port() -> int:
    """A port below the ephemeral range that nothing listens on right now."""
    choice = random.SystemRandom()  # not the seeded schedule: a replay needs a free port too
    for _ in range(200):
        port = choice.choice(PORTS)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError("no free port in 20000..29999")


class JournalWrites:
    """Wakes the test as soon as b writes to its journal (Linux inotify, IN_MODIFY)."""

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if libc.inotify_add_watch(self.fd, os.fsencode(directory), IN_MODIFY) < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory} failed")

    def wait(self, timeout: float) -> set[str]:
        """Names of the files written since the last call (waits for one); empty on timeout."""
        names: set[str] = set()
        if select.select([self.fd], [], [], timeout)[0]:
            with contextlib.suppress(BlockingIOError):
                data = os.read(self.fd, 65536)
                offset = 0
                while offset < len(data):  # struct inotify_event: wd, mask, cookie, len, name
                    length = _INOTIFY_EVENT.unpack_from(data, offset)[3]
                    start = offset + _INOTIFY_EVENT.size
                    names.add(data[start:start + length].rstrip(b"\0").decode())
                    offset = start + length
        return names

    def close(self) -> None:
        os.close(self.fd)


def stop_b_after_it_stores(pair: Pair, count: int, note: str) -> None:
    """SIGSTOP b just after it wrote the `count`-th frame that stores calls from a.

    b appends a batch of a's calls with its link's new high-water mark (a K_LINK record) in one
    frame, fsyncs, then acknowledges. At every write to its journal b is stopped at once and
    the bytes it added are searched for a K_LINK record: if there is one, b stays stopped, most
    likely between storing the batch and acknowledging it (a kill at random lands there rarely:
    the window is one fsync long); otherwise b goes on.
    """
    b = pair.b
    assert b is not None
    b.wait(lambda life: "ready" in life.lines, "start", note)
    directory = pair.root / "b" / "journal"
    writes = JournalWrites(directory)
    read: dict[str, int] = {}  # segment -> how far its frames were searched
    try:
        for name in os.listdir(directory):
            if name.endswith(".seg"):
                read[name] = _written(directory / name, 0)[1]
        deadline = time.monotonic() + LIMIT_S
        while count > 0:
            names = writes.wait(max(0.0, deadline - time.monotonic()))
            assert names or time.monotonic() < deadline, f"b stopped writing; {note}"
            b.process.send_signal(signal.SIGSTOP)
            stores = False
            for name in sorted(n for n in names if n.endswith(".seg")):
                added, read[name] = _written(directory / name, read.get(name, 0))
                stores = stores or _LINK_FROM_A in added
            if stores:
                count -= 1
            if count:
                b.process.send_signal(signal.SIGCONT)
    finally:
        writes.close()


def _written(path: Path, offset: int) -> tuple[bytes, int]:
    """(the bytes b wrote to segment `path` after `offset`, where they end). Segments are
    preallocated with zeros, so what was written ends at the last non-zero byte (a frame's zero
    padding is read again next time, which does no harm)."""
    with open(path, "rb") as file:
        file.seek(offset)
        added = file.read().rstrip(b"\0")
    return added, offset + len(added)


def kill_moment(pair: Pair, round_no: int) -> tuple[str, str]:
    """Wait for this round's seeded moment to kill; return its kind and how it was chosen."""
    rng = pair.rng
    a, b = pair.a, pair.b
    assert a is not None and b is not None
    kind = rng.choices(("early", "a calls", "b handlers", "b stores"), weights=(1, 3, 3, 3))[0]
    if kind == "b stores" and not sys.platform.startswith("linux"):
        kind = "a calls"  # no inotify
    note = f"round {round_no}; {pair.note}"
    target = 0
    delay = 0.0
    if kind == "early":
        time.sleep(rng.uniform(0.0, 0.5))
    elif kind == "b stores":
        target = rng.choice((1, 2, 5, 20, 100))
        stop_b_after_it_stores(pair, target, note)  # b stays stopped: no delay after this
    else:
        if rng.random() < 0.25:  # right after (re)starting: the first batches, the first acks
            target = rng.choice((1, 3, 10, 30))
        else:
            target = int(ROUND_CALLS * rng.uniform(0.2, 1.8))
        life, count = (a, "made") if kind == "a calls" else (b, "begins")
        base = getattr(life, count)
        try:
            life.wait(lambda life: getattr(life, count) >= base + target,
                      f"{target} more {'calls acknowledged' if life is a else 'handlers started'}",
                      note)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n(a {'paused' if pair.paused else 'going'}, "
                                 f"{pair.lead} calls ahead of b)") from None
        delay = rng.choice((0.0, 0.0, rng.uniform(0.0, 0.002), rng.uniform(0.0, 0.02)))
        time.sleep(delay)
    return kind, f"{kind}{f' {target}' if target else ''} +{delay * 1000:.1f} ms"


def run_round(pair: Pair, round_no: int) -> None:
    """Start what is down (b first), then SIGKILL a, b or both at a random moment."""
    pair.check_running()
    if pair.b is None:
        pair.start("b")
    if pair.a is None:
        pair.start("a")
    victims = pair.rng.choices((["a"], ["b"], ["a", "b"]), weights=(4, 4, 2))[0]
    started = time.monotonic()
    kind, moment = kill_moment(pair, round_no)
    pair.tally[f"kills of {'+'.join(victims)} ({kind})"] += 1
    pair.history.append(f"{round_no}: {'+'.join(victims)} at {moment} "
                        f"({time.monotonic() - started:.1f} s)")
    if len(victims) == 2:
        pair.rng.shuffle(victims)
        crashkit.sigkill(getattr(pair, victims[0]).process)
        time.sleep(pair.rng.choice((0.0, pair.rng.uniform(0.0, 0.003),
                                    pair.rng.uniform(0.0, 0.05))))
    for role in victims:
        pair.kill(role)
    if pair.b is not None and kind == "b stores":
        pair.b.process.send_signal(signal.SIGCONT)  # b was stopped, not killed: it goes on


def drain(pair: Pair) -> None:
    """a stops making calls and drains (b acknowledged everything), then b runs what it has;
    b is killed once more and started again, to drain and stop cleanly."""
    pair.check_running()
    if pair.b is None:
        pair.start("b")
    if pair.a is None:
        pair.start("a")
    a, b = pair.a, pair.b
    assert a is not None and b is not None
    with pair.governor:
        pair.draining = True  # "drain" lets a's producers go on if they were paused
    drain_life(a, pair.note)
    drain_life(b, pair.note)
    stop_life(a, pair.note)
    pair.a = None
    pair.kill("b")
    last = pair.start("b")
    drain_life(last, pair.note)
    stop_life(last, pair.note)
    pair.b = None
    pair.tally["b's last life (clean stop) ran again"] += last.begins


def drain_life(life: Life, note: str) -> None:
    """Tell a child to drain; it must leave nothing pending and no dead letter."""
    life.command("drain")
    life.wait(lambda life: any(line.startswith("drained ") for line in life.lines), "drain",
              note)
    drained = next(line for line in life.lines if line.startswith("drained "))
    assert drained == "drained 0 0", (
        f"{life.role}{life.number} drained to {drained!r} (outstanding, dead); {note}")


def stop_life(life: Life, note: str) -> None:
    """Tell a child to stop its cage; it must exit 0."""
    life.command("stop")
    life.finish()
    assert life.returncode == 0 and life.lines[-1:] == ["stopped"], (
        f"{life.role}{life.number} did not stop cleanly ({life.returncode}, {life.lines[-2:]});"
        f" {note}:\n{life.stderr()}")


def read_runs(pair: Pair) -> dict[str, list[Run]]:
    """Call id -> its executions on b in the order they started, from each life of b in turn."""
    files = [pair.runs_file(life.number) for life in pair.lives["b"]]
    # Two open runs alike are two copies of one call running at once: check_runs says so.
    return crashkit.read_runs(files, pair.note, begin="begin", copies=True)


def check_accepted(pair: Pair) -> None:
    """b's journal held each of a's calls once, in the order a made them."""
    note = pair.note
    seqs_of: dict[str, list[int]] = defaultdict(list)
    links: dict[str, list[tuple[int, int]]] = defaultdict(list)  # a's journal -> (b seq, a key)
    for seq, (call_id, _) in sorted(pair.accepted.items()):
        seqs_of[call_id].append(seq)
        _, journal, key = call_id.split(":")
        links[journal].append((seq, int(key)))
    for call_id, seqs in seqs_of.items():
        assert len(seqs) == 1, (
            f"b's journal holds {call_id} {len(seqs)} times (seqs {seqs}): accepted more than "
            f"once; {note}")
    for journal, keys in links.items():
        for (seq1, key1), (seq2, key2) in itertools.pairwise(keys):
            assert key1 < key2, (
                f"b accepted a:{journal}:{key2} (seq {seq2}) after a:{journal}:{key1} (seq "
                f"{seq1}): not in the order a made them; {note}")
    pair.tally["calls in b's journal scans"] = len(pair.accepted)


def check_runs(pair: Pair, runs: dict[str, list[Run]]) -> None:
    """What a acknowledged ran on b, once, or again only after a kill of b; nothing else ran."""
    note, tally = pair.note, pair.tally
    tried, made, groups = crashkit.read_reports(life.lines for life in pair.lives["a"])

    last_life = pair.lives["b"][-1].number
    for call_id, executions in runs.items():
        firsts = [r for r in executions if r.attempt == 1]  # none: killed before "begin"
        assert len(firsts) <= 1, (
            f"{call_id} ran {len(firsts)} times as attempt 1: b accepted it more than once: "
            f"{executions}; {note}")
        crashkit.check_reruns(call_id, executions, note, tally, life="b's life")
        assert executions[-1].ended, f"{call_id} never completed on b: {executions}; {note}"
        assert all(r.ended for r in executions if r.life == last_life), (
            f"{call_id} did not end in b's last life: {executions}; {note}")
        tally["calls run on b"] += 1

    ran = crashkit.ran_tags(runs, note)
    for tag in ran:
        assert tag in tried, f"{tag} ran on b but a never tried it; {note}"

    for tag, call_id in made.items():
        assert tag in ran, f"{tag} ({call_id}) was acknowledged by a but never ran on b; {note}"
        assert ran[tag] == call_id, f"{tag} ran as {ran[tag]}, acknowledged as {call_id}; {note}"
    for seq, (call_id, tag) in pair.accepted.items():
        assert ran.get(tag) == call_id, (
            f"b accepted {tag} as {call_id} (seq {seq}) but ran it as {ran.get(tag)}; {note}")
    crashkit.check_transactions(groups, ran, note, tally)
    tally["calls acknowledged by a"] = len(made)
    tally["calls tried by a"] = len(tried)


def run_rounds(tmp_path: Path, part: int, count: int) -> None:
    """`count` rounds of kills on a fresh pair of cages, a drain, and the checks."""
    note = f"PMQ_CRASH_SEED={SEED} part {part} ({count} rounds of ~{ROUND_CALLS} calls)"
    print(note)  # pytest shows it with any failure, including an unexpected exception
    pair = Pair(tmp_path, free_port(), random.Random(f"{SEED}-{part}"), note)
    started = time.monotonic()
    try:
        for round_no in range(count):
            run_round(pair, round_no)
        drain(pair)
    finally:
        for life in (pair.a, pair.b):
            if life is not None:
                life.kill()
    print("kills: " + "; ".join(pair.history))
    check_accepted(pair)
    check_runs(pair, read_runs(pair))
    tally = pair.tally
    tally["lives of a"], tally["lives of b"] = len(pair.lives["a"]), len(pair.lives["b"])
    print(f"{note}: {time.monotonic() - started:.1f} s; " + crashkit.format_tally(tally))
    assert tally["calls acknowledged by a"] > 0, f"a acknowledged no call; {note}"


def _parts() -> list[object]:
    """One part in ``make test``; ROUNDS / PART_ROUNDS parts marked torture under PMQ_TORTURE."""
    if not TORTURE:
        return [0]
    return [pytest.param(part, marks=pytest.mark.torture)
            for part in range(ROUNDS // PART_ROUNDS)]


@pytest.mark.parametrize("part", _parts())
def test_sigkill_of_either_cage_loses_and_duplicates_no_call(tmp_path: Path, part: int) -> None:
    """a streams calls to b; SIGKILLs of a, b or both lose no acknowledged call, none twice."""
    run_rounds(tmp_path, part, min(ROUNDS, PART_ROUNDS))
