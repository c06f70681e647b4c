"""Show the journal's promise: nothing acknowledged is lost when the process is killed.

This is what ``make demo`` runs.

A child process runs 16 threads that each append 100-byte records with durability "always" and,
once ``sync`` has returned, report the record's seq to this (parent) process through a pipe: that
report is the acknowledgement. The parent SIGKILLs the child at a random moment, starts it again
on the same journal (it recovers and goes on appending), three times; then it opens the journal
itself, replays every record and checks it against the acknowledgements.

Owns: the demo workload and its verdict. Must not: touch the journal's files itself (only
``pmq._journal.Journal`` reads and writes them).

Invariants checked:
- lost = 0: every acknowledged seq is recovered, with exactly the payload that was appended;
- phantoms = 0: every recovered record is one the workload wrote (its checksum verifies, its
  writer existed) and none appears twice;
- seqs are contiguous from 1, and each restart recovers at least every seq acknowledged so far.
Exit status: 0 when all hold, 1 when any fails, 2 when the demo itself could not run.

Usage::

    .venv/bin/python bench/demo_journal.py [--threads 16] [--kills 3] [--seed N] [--keep]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import _benchutil as bu

PAYLOAD_BYTES = 100
ACK = struct.Struct("<QIHH")  # seq, counter, thread, run: 16 bytes, one atomic pipe write
IDENTITY = struct.Struct("<HHI")  # run, thread, counter at the start of every payload
CHILD_MAX_SECONDS = 60.0  # a child that is never killed stops by itself
READY_TIMEOUT_S = 60.0


def make_payload(run: int, thread: int, counter: int) -> bytes:
    """The one payload thread ``thread`` of run ``run`` appends as its ``counter``-th record."""
    head = IDENTITY.pack(run, thread, counter)
    filler = f" run {run} thread {thread} record {counter} |".encode() * 8
    body = (head + filler)[: PAYLOAD_BYTES - 4]
    return body + struct.pack("<I", zlib.crc32(body))


def parse_payload(payload: bytes) -> tuple[int, int, int] | None:
    """(run, thread, counter) of a payload this demo wrote, or None if it is not one."""
    if len(payload) != PAYLOAD_BYTES:
        return None
    body, (crc,) = payload[:-4], struct.unpack("<I", payload[-4:])
    if zlib.crc32(body) != crc:
        return None
    run, thread, counter = IDENTITY.unpack_from(payload)
    if make_payload(run, thread, counter) != payload:
        return None
    return run, thread, counter


# ---------------------------------------------------------------------------------------------
# the child: appends until it is killed


def child_main(directory: str, ack_fd: int, run: int, threads: int) -> int:
    """Open the journal, say how much it recovered, then append+sync from ``threads`` threads."""
    from pmq._journal import Journal

    journal = Journal(directory, durability="always")
    print(f"ready {journal.next_seq} {journal.durable_seq}", flush=True)
    stop_at = time.monotonic() + CHILD_MAX_SECONDS
    failures: list[BaseException] = []

    def worker(thread: int) -> None:
        append, sync, write, pack = journal.append, journal.sync, os.write, ACK.pack
        counter = 0
        try:
            while time.monotonic() < stop_at:
                seq = append(make_payload(run, thread, counter))
                sync(seq)
                write(ack_fd, pack(seq, counter, thread, run))  # the acknowledgement
                counter += 1
        except BaseException as exc:
            failures.append(exc)
            raise

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    journal.close()
    return 3 if failures else 0


# ---------------------------------------------------------------------------------------------
# the parent


class AckReader(threading.Thread):
    """Collects the child's acknowledgements from the pipe until every writer has closed it."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.acks: list[tuple[int, int, int, int]] = []

    def run(self) -> None:
        pending = b""
        while True:
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                break
            pending += chunk
            usable = len(pending) - len(pending) % ACK.size
            self.acks.extend(ACK.iter_unpack(pending[:usable]))
            pending = pending[usable:]
        os.close(self.fd)


def run_child(directory: Path, run: int, threads: int, kill_after: float) -> dict[str, Any]:
    """Start one child, kill it ``kill_after`` seconds after it is ready, return what it acked."""
    read_fd, write_fd = os.pipe()
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        str(directory),
        "--ack-fd",
        str(write_fd),
        "--run",
        str(run),
        "--threads",
        str(threads),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(write_fd,), text=True
    )
    os.close(write_fd)
    reader = AckReader(read_fd)
    reader.start()
    assert proc.stdout is not None and proc.stderr is not None

    ready: list[str] = []
    line_reader = threading.Thread(
        target=lambda: ready.append(proc.stdout.readline() if proc.stdout else ""), daemon=True
    )
    line_reader.start()
    line_reader.join(READY_TIMEOUT_S)
    if not ready or not ready[0].startswith("ready "):
        proc.kill()
        proc.wait()
        raise RuntimeError(
            f"run {run}: the child did not start: {proc.stderr.read().strip() or 'no output'}"
        )
    _, next_seq, durable_seq = ready[0].split()
    started = time.monotonic()
    time.sleep(kill_after)
    exited_early = proc.poll()
    os.kill(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    proc.wait()
    reader.join()
    stderr = proc.stderr.read().strip()
    proc.stdout.close()
    proc.stderr.close()
    if exited_early is not None:
        raise RuntimeError(f"run {run}: the child exited by itself ({exited_early}): {stderr}")
    return {
        "run": run,
        "pid": proc.pid,
        "recovered_next_seq": int(next_seq),
        "recovered_durable_seq": int(durable_seq),
        "ran_s": killed - started,
        "acks": reader.acks,
    }


def verify(
    directory: Path, acks: list[tuple[int, bytes]], runs: int, threads: int
) -> dict[str, Any]:
    """Open the journal after the last kill, replay everything, compare with the acks."""
    from pmq._journal import Journal

    start = time.perf_counter()
    journal = Journal(directory)
    open_s = time.perf_counter() - start
    try:
        recovered: dict[int, bytes] = {}
        gaps = 0
        expected = 1
        for seq, payload in journal.replay():
            if seq != expected:
                gaps += 1
            expected = seq + 1
            recovered[seq] = bytes(payload)
        next_seq = journal.next_seq
    finally:
        journal.close()

    # every acknowledgement counts, even a second one for the same seq (only one can be right)
    lost = sorted(seq for seq, payload in acks if recovered.get(seq) != payload)
    acked = {seq for seq, _ in acks}
    phantoms: list[int] = []
    seen: set[tuple[int, int, int]] = set()
    for seq, payload in recovered.items():
        identity = parse_payload(payload)
        bad = (
            identity is None
            or identity in seen
            or not 1 <= identity[0] <= runs
            or not 0 <= identity[1] < threads
        )
        if bad:
            phantoms.append(seq)
        else:
            assert identity is not None
            seen.add(identity)
    in_flight = len(set(recovered) - set(phantoms) - set(acked))
    return {
        "open_s": open_s,
        "recovered": len(recovered),
        "next_seq": next_seq,
        "gaps": gaps,
        "lost": lost,
        "phantoms": phantoms,
        "in_flight": in_flight,
    }


def parent_main(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1 << 31)
    rng = random.Random(seed)
    work = bu.make_work_dir(args.dir, "demo-")
    directory = work / "journal"
    mount = bu.mount_of(work)
    print(
        f"pmq journal demo: {args.threads} threads append {PAYLOAD_BYTES}-byte records with "
        f'durability "always"\n(a record is acknowledged only after the fsync that covers it) '
        f"and the process is SIGKILLed\nat a random moment, {args.kills} times (seed {seed}).\n"
        f"journal: {directory} ({mount['fs_type']} on {mount['source']})\n"
    )
    busy = bu.busy_warning(bu.machine_activity(0.3))
    if busy:
        print(busy + " (it slows the demo, it cannot make it lose anything)\n")
    acks: list[tuple[int, bytes]] = []
    highest_acked = 0
    acked_seqs: set[int] = set()
    problems: list[str] = []
    rows: list[list[str]] = []
    total_ran = 0.0
    try:
        for run in range(1, args.kills + 1):
            kill_after = rng.uniform(args.min_run, args.max_run)
            result = run_child(directory, run, args.threads, kill_after)
            recovered_upto = result["recovered_next_seq"] - 1
            before = highest_acked
            restart_ok = recovered_upto >= before
            if not restart_ok:
                problems.append(
                    f"run {run} recovered up to seq {recovered_upto}, but seq {before} was acked"
                )
            duplicates = 0
            for seq, counter, thread, run_no in result["acks"]:
                if seq in acked_seqs:
                    duplicates += 1
                acked_seqs.add(seq)
                highest_acked = max(highest_acked, seq)
                acks.append((seq, make_payload(run_no, thread, counter)))
            if duplicates:
                problems.append(f"run {run}: {duplicates} seqs acknowledged twice")
            n = len(result["acks"])
            total_ran += result["ran_s"]
            rows.append(
                [
                    str(run),
                    str(result["pid"]),
                    f"{result['ran_s']:.2f} s",
                    f"{n:,}",
                    f"{n / result['ran_s']:,.0f}",
                    "empty journal"
                    if run == 1
                    else f"seqs 1..{recovered_upto:,} (highest acked {before:,}: "
                    f"{'ok' if restart_ok else 'MISSING'})",
                ]
            )
        print(
            bu.render_table(
                ["run", "pid", "killed after", "acknowledged", "records/s", "recovered on restart"],
                rows,
                align="rrrrrl",
            )
        )
        check = verify(directory, acks, args.kills, args.threads)
    except Exception as exc:
        print(f"\nthe demo could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"\n(kept {work})")
        else:
            bu.remove_tree(work)

    if check["gaps"]:
        problems.append(f"{check['gaps']} gaps in the recovered seqs")
    lost, phantoms = check["lost"], check["phantoms"]
    throughput = len(acks) / total_ran if total_ran else 0.0
    print(
        f"\nafter the last kill: Journal(dir) opened in {check['open_s']:.2f} s "
        "and every record replayed\n"
    )
    tally = [
        ["acknowledged (fsynced, then reported to the parent)", f"{len(acks):,}"],
        ["recovered", f"{check['recovered']:,}"],
        ["  of which in flight at a kill (durable, ack not yet sent)", f"{check['in_flight']:,}"],
        ["lost (acknowledged, but missing or altered)", f"{len(lost):,}"],
        ["phantoms (never written, corrupt or duplicated)", f"{len(phantoms):,}"],
        ["throughput (acknowledged / time running)", f"{throughput:,.0f} records/s"],
    ]
    print(bu.render_table(["", "count"], tally, align="lr"))
    if lost:
        problems.append(f"{len(lost)} acknowledged records lost, first seqs {lost[:10]}")
    if phantoms:
        problems.append(f"{len(phantoms)} phantom records, first seqs {phantoms[:10]}")
    if problems:
        print("\nFAIL:\n  " + "\n  ".join(problems))
        return 1
    print(
        f"\nPASS: all {len(acks):,} acknowledged records survived {args.kills} SIGKILLs, "
        "with nothing invented."
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--threads", type=int, default=16, help="appending threads (default 16)")
    parser.add_argument("--kills", type=int, default=3, help="how many SIGKILLs (default 3)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill moments")
    parser.add_argument("--min-run", type=float, default=1.5, help="earliest kill, s after start")
    parser.add_argument("--max-run", type=float, default=4.0, help="latest kill, s after start")
    parser.add_argument("--dir", default=None, help="scratch base (default bench/.work)")
    parser.add_argument("--keep", action="store_true", help="keep the journal directory")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ack-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child_main(args.child, args.ack_fd, args.run, args.threads)
    if not 0 < args.min_run <= args.max_run:
        parser.error("need 0 < --min-run <= --max-run")
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
