"""Process crashes: SIGKILL a busy journal at a random moment and check what a reopen recovers.

Each round runs tests/crash_workload.py in a child process (16 threads, or 64 asyncio tasks, in
"always" mode, with append_many batches and small segments so kills land during rolls), kills it
with SIGKILL after a seeded random delay, and reopens a copy of its directory. The next round of
the same group reopens the original directory in a new child, so recovery of a torn tail (and a
kill during that recovery) is part of the workload too.

Checked after every kill (docs/journal.md "Durability modes", DESIGN.md §4):
- every unit the child reported as synced is there, at the seqs it reported, byte for byte;
- seqs are contiguous from 1, with no gap and no duplicate, and next_seq follows the last one;
- every recovered payload is one the workload made, and each appears once;
- an append_many batch is there whole or not at all;
- per producer, recovered units are a prefix of what it appended, at most one unit past its
  last report (it appends the next unit only after the previous one was durable);
- what an earlier round recovered is a prefix of what this round recovers (recovery is stable).

The seed is printed for every round (pytest shows it with a failure) and named in every assertion;
set PMQ_CRASH_SEED to run the same kill delays again (thread scheduling still differs).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from crash_workload import READY_WORKER, REPORT, make_payload, parse_payload
from pmq._journal import Journal

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")

WORKLOAD = Path(__file__).with_name("crash_workload.py")
KIB = 1024
MIB = 1024 * KIB
SEGMENT_SIZES = (256 * KIB, 1 * MIB)
#: Rounds that reuse one directory (each a new child recovering the previous one's crash).
LIVES_PER_GROUP = 3
MAX_KILL_DELAY_S = 0.35
#: A directory that grew past this is left behind and the next life starts a new one.
MAX_DIRECTORY_BYTES = 48 * MIB
#: How long to wait for a child to get going; only a limit on a hang, not a measured time.
START_LIMIT_S = 120.0
SEED = int(os.environ.get("PMQ_CRASH_SEED", random.SystemRandom().randrange(2**32)))


@dataclass
class Life:
    """What one child process reported before it was killed."""

    acked: list[tuple[int, int, int, int]] = field(default_factory=list)
    ready: bool = False
    first_ack: threading.Event = field(default_factory=threading.Event)
    stderr: bytes = b""


@dataclass
class History:
    """What the parent knows about one directory across the lives of its children."""

    recovered: list[bytes] = field(default_factory=list)
    #: (life, worker) -> highest unit reported durable
    last_acked: dict[tuple[int, int], int] = field(default_factory=dict)
    #: last seq -> (life, worker, unit, k) of every acknowledged unit, all lives
    acks: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)


def _read_reports(stream: Any, life: Life) -> None:
    """Collect fixed-size reports from the child's stdout until it closes (the child died)."""
    buffer = b""
    while True:
        chunk = stream.read1(65536)
        if not chunk:
            break
        buffer += chunk
        whole = len(buffer) - len(buffer) % REPORT.size
        for offset in range(0, whole, REPORT.size):
            seq, worker, unit, k = REPORT.unpack_from(buffer, offset)
            if worker == READY_WORKER:
                life.ready = True
            else:
                life.acked.append((seq, worker, unit, k))
                life.first_ack.set()
        buffer = buffer[whole:]
    life.first_ack.set()  # wake the parent if the child died before acknowledging anything


def run_life(
    directory: Path, life_no: int, mode: str, workers: int, segment_bytes: int, rng: random.Random
) -> Life:
    """Start a child on ``directory``, SIGKILL it at a random moment, return what it reported."""
    early = rng.random() < 0.15  # sometimes kill while the child is still opening (recovering)
    delay = rng.uniform(0.0, 0.25 if early else MAX_KILL_DELAY_S)
    child = subprocess.Popen(
        [
            sys.executable,
            str(WORKLOAD),
            str(directory),
            str(life_no),
            mode,
            str(workers),
            str(segment_bytes),
            str(rng.randrange(2**31)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    life = Life()
    reader = threading.Thread(target=_read_reports, args=(child.stdout, life), daemon=True)
    reader.start()
    try:
        if not early:
            life.first_ack.wait(START_LIMIT_S)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
    finally:
        returncode = child.wait(timeout=START_LIMIT_S)
        reader.join(START_LIMIT_S)
        assert child.stderr is not None
        life.stderr = child.stderr.read()
        child.stdout.close()  # type: ignore[union-attr]
        child.stderr.close()
    assert returncode == -signal.SIGKILL, (
        f"child exited by itself ({returncode}), seed {SEED}:\n"
        + life.stderr.decode(errors="replace")
    )
    assert early or life.acked, f"child never acknowledged anything, seed {SEED}"
    return life


def recover(directory: Path, segment_bytes: int) -> tuple[list[tuple[int, bytes]], int]:
    """Open ``directory`` (a copy, so the next child recovers the original), replay it all."""
    with Journal(directory, segment_bytes=segment_bytes) as journal:
        records = list(journal.replay())
        next_seq = journal.next_seq
        assert journal.floor <= 1
    return records, next_seq


def check_recovery(
    records: list[tuple[int, bytes]],
    next_seq: int,
    history: History,
    life_no: int,
    life: Life,
    note: str,
) -> None:
    """Assert every invariant of the module docstring for one recovered journal."""
    seqs = [seq for seq, _ in records]
    assert seqs == list(range(1, len(records) + 1)), f"gap or duplicate in seqs; {note}"
    assert next_seq == len(records) + 1, f"next_seq {next_seq} after {len(records)}; {note}"

    payloads = [payload for _, payload in records]
    prefix = history.recovered
    assert payloads[: len(prefix)] == prefix, f"an earlier recovery is no longer a prefix; {note}"

    for worker_unit in life.acked:
        history.acks[worker_unit[0]] = (life_no, *worker_unit[1:])
        key = (life_no, worker_unit[1])
        history.last_acked[key] = max(history.last_acked.get(key, -1), worker_unit[2])

    parsed = []
    for seq, payload in records:
        try:
            parsed.append(parse_payload(payload))
        except ValueError as error:
            raise AssertionError(
                f"seq {seq} holds a payload never appended ({error}); {note}"
            ) from None
    assert len(set(parsed)) == len(parsed), f"a payload was recovered twice; {note}"

    # append_many is all or nothing: j runs 0..k-1 over consecutive seqs, every time.
    index = 0
    while index < len(parsed):
        life_id, worker, unit, k, j = parsed[index]
        assert j == 0, f"seq {index + 1} starts in the middle of a batch; {note}"
        batch = parsed[index : index + k]
        assert batch == [(life_id, worker, unit, k, jj) for jj in range(k)], (
            f"batch at seq {index + 1} is torn: {len(batch)} of {k} records; {note}"
        )
        index += k

    # Per producer: a prefix of its units, at most one past its last acknowledged one.
    units: dict[tuple[int, int], list[int]] = {}
    for life_id, worker, unit, _k, j in parsed:
        assert life_id <= life_no, f"payload from a life that never ran; {note}"
        if j == 0:
            units.setdefault((life_id, worker), []).append(unit)
    for key, seen in units.items():
        assert seen == list(range(len(seen))), f"producer {key} has a hole in its units; {note}"
        assert seen[-1] <= history.last_acked.get(key, -1) + 1, (
            f"producer {key} recovered unit {seen[-1]} but acked only "
            f"{history.last_acked.get(key, -1)}; {note}"
        )

    # Every acknowledged unit, from every life so far, is there at the seqs reported.
    for last_seq, (life_id, worker, unit, k) in history.acks.items():
        assert last_seq <= len(payloads), (
            f"acked seq {last_seq} lost (have {len(payloads)}); {note}"
        )
        expected = [make_payload(life_id, worker, unit, k, j) for j in range(k)]
        assert payloads[last_seq - k : last_seq] == expected, (
            f"acked unit at {last_seq} differs; {note}"
        )

    history.recovered = payloads


def _bytes_in(directory: Path) -> int:
    """Total size of the files in ``directory``."""
    return sum(entry.stat().st_size for entry in directory.iterdir())


def run_group(tmp_path: Path, group: int, mode: str, workers: int, lives: int) -> None:
    """``lives`` children killed in turn on one directory (a new one once it grows big)."""
    rng = random.Random(f"{SEED}-{mode}-{group}")
    directory = tmp_path / "journal-0"
    history = History()
    for life_no in range(1, lives + 1):
        if life_no == 1 or _bytes_in(directory) > MAX_DIRECTORY_BYTES:
            directory = tmp_path / f"journal-{life_no}"
            directory.mkdir()
            history = History()
            segment_bytes = rng.choice(SEGMENT_SIZES)
        life = run_life(directory, life_no, mode, workers, segment_bytes, rng)
        note = (
            f"PMQ_CRASH_SEED={SEED}, {mode} group {group} life {life_no} in {directory.name}, "
            f"segment {segment_bytes}, {len(life.acked)} acked"
        )
        print(note)  # pytest shows it with any failure, including an unexpected exception
        copy = tmp_path / f"recovered-{life_no}"
        shutil.copytree(directory, copy)
        records, next_seq = recover(copy, segment_bytes)
        check_recovery(records, next_seq, history, life_no, life, note)
        # Recovery is idempotent: the recovered copy reopens to the same records.
        again, again_next = recover(copy, segment_bytes)
        assert again == records and again_next == next_seq, f"second reopen differs; {note}"
        shutil.rmtree(copy)


@pytest.mark.parametrize("group", range(10))
def test_sigkill_during_threaded_group_commit_loses_no_acknowledged_record(
    tmp_path: Path, group: int
) -> None:
    """16 threads in "always" mode, killed thrice: acked records survive, nothing else appears."""
    run_group(tmp_path, group, "threads", workers=16, lives=LIVES_PER_GROUP)


@pytest.mark.parametrize("group", range(4))
def test_sigkill_during_asyncio_group_commit_loses_no_acknowledged_record(
    tmp_path: Path, group: int
) -> None:
    """64 coroutines awaiting sync_async, killed thrice: the same invariants hold."""
    run_group(tmp_path, group, "asyncio", workers=64, lives=LIVES_PER_GROUP)


@pytest.mark.torture
@pytest.mark.parametrize("group", range(50))
def test_sigkill_torture_threads(tmp_path: Path, group: int) -> None:
    """1,000 kills of the threaded workload (50 groups x 20 lives)."""
    run_group(tmp_path, 1000 + group, "threads", workers=16, lives=20)


@pytest.mark.torture
@pytest.mark.parametrize("group", range(20))
def test_sigkill_torture_asyncio(tmp_path: Path, group: int) -> None:
    """300 kills of the asyncio workload (20 groups x 15 lives)."""
    run_group(tmp_path, 1000 + group, "asyncio", workers=64, lives=15)
