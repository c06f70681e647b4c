"""Durable queued calls on one machine: pmq against sqlite3 and persist-queue, in one run.

Run it with::

    .venv/bin/python bench/compare_local.py                  # everything, ~3 s per case (~1 min)
    .venv/bin/python bench/compare_local.py --quick          # ~1 s per case
    .venv/bin/python bench/compare_local.py --cases sqlite_one,pq_ack,pmq_asyncio --no-save
    .venv/bin/python -m pip install persist-queue            # the script tries this itself

Owns: one process run that stores the call ``accounts.credit(12345, amount=10, memo="x" * 40)``
durably (fsync before the call is acknowledged) with each contender, prints the table and saves it
as JSON in bench/results/local-<timestamp>.json. Must not: give any contender weaker durability
than the others, or print a number it did not measure (a case that cannot run says why).

Contenders (bench/_compare_cases.py holds the measurements):
- sqlite3 (stdlib), WAL + ``PRAGMA synchronous=FULL``: the call as a row of a queue table
  (queue, module, method, msgpack'd args, created, status); one INSERT per COMMIT, and 1,000.
- persist-queue's ``SQLiteAckQueue`` (pip ``persist-queue``): ``auto_commit=True``, msgpack
  serializer, ``synchronous=FULL`` set on its connection and read back.
- pmq: ``execute`` from 1 and 64 threads, ``aexecute`` from 1,000 asyncio tasks, transactions of
  1,000 calls, and loopback end to end (calls, then ``cage.drain()``). These rows say
  "pmq.Cage not available yet" until ``import pmq; pmq.Cage`` works.

Invariants:
- Every case runs in its own child process (this file with ``--child``) on a fresh directory under
  bench/.work (never tmpfs), with a time limit; a child that hangs is killed and the row shows the
  stacks it dumped (faulthandler) before the limit.
- ``x best lib`` divides by the best per-call durable rate of the compared libraries measured in
  the same run: max(sqlite3 one INSERT per COMMIT, persist-queue put).
- ``os.sync()`` runs between cases so one case's writeback does not land in the next one's window.
- "calls/fsync" of a pmq row is the calls made in the window divided by the fsyncs of the cage's
  journal in it (``cage.stats()["journal"]["fsyncs"]``), which includes the fsyncs of the
  dispatcher's attempt and completion records, since handlers run during every case.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import sqlite3
import subprocess
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import _benchutil as bu
from _compare_cases import (
    ASYNC_PRODUCERS,
    BATCH_CALLS,
    THREAD_PRODUCERS,
    CaseResult,
    run_case,
)
from _report_cases import settle

LIBRARY_CASES = ("sqlite_one", "sqlite_batch", "pq_ack")
PMQ_CASES = ("pmq_one", "pmq_threads", "pmq_asyncio", "pmq_xa", "pmq_e2e")
CASE_ORDER = LIBRARY_CASES + PMQ_CASES
PER_CALL_BASELINES = ("sqlite_one", "pq_ack")
LABELS = {
    "sqlite_one": "sqlite3 WAL, 1 INSERT per COMMIT, 1 thread",
    "sqlite_batch": f"sqlite3 WAL, {BATCH_CALLS:,} INSERTs per COMMIT",
    "pq_ack": "persist-queue SQLiteAckQueue.put, 1 thread",
    "pmq_one": "pmq execute, 1 thread",
    "pmq_threads": f"pmq execute, {THREAD_PRODUCERS} threads",
    "pmq_asyncio": f"pmq aexecute, {ASYNC_PRODUCERS:,} asyncio tasks",
    "pmq_xa": f"pmq transactions of {BATCH_CALLS:,} calls",
    "pmq_e2e": "pmq loopback end to end (calls + drain)",
}
ASYNC_MIN_CALLS_PER_S = 100_000
ASYNC_MIN_RATIO = 25.0
XA_MIN_CALLS_PER_S = 300_000
E2E_MIN_CALLS_PER_S = 50_000

# ---------------------------------------------------------------------------------------------
# availability


def pmq_cage_problem() -> str | None:
    """None when ``import pmq; pmq.Cage`` works, else what went wrong."""
    try:
        import pmq

        pmq.Cage  # noqa: B018 - the attribute access is the check
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def ensure_persist_queue(install: bool) -> str | None:
    """None when persist-queue imports (installing it with pip first if allowed), else why not."""
    try:
        import persistqueue  # noqa: F401
    except ImportError as exc:
        if not install:
            return f"persist-queue is not installed ({exc}); pip install persist-queue"
    else:
        return None
    print("persist-queue is missing: pip install persist-queue ...", flush=True)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "persist-queue"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"persist-queue could not be installed: {exc!r}"
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
        return f"persist-queue could not be installed (pip exit {out.returncode}: {tail[0]})"
    return None


# ---------------------------------------------------------------------------------------------
# running a case in a child


def _child_timeout(name: str, args: argparse.Namespace) -> float:
    if name == "pmq_e2e":
        return float(args.seconds + args.drain_timeout + 60.0)
    return float(args.seconds * 3 + 60.0)


def run_child(name: str, work: Path, args: argparse.Namespace) -> CaseResult:
    """Run one case in a fresh interpreter; a crash, hang or bad output becomes the row's error."""
    case_dir = work / name
    case_dir.mkdir()
    timeout = _child_timeout(name, args)
    command = bu.child_command(
        __file__,
        name,
        "--dir",
        str(case_dir),
        "--seconds",
        str(args.seconds),
        "--e2e-calls",
        str(args.e2e_calls),
        "--drain-timeout",
        str(args.drain_timeout),
        "--child-timeout",
        str(timeout),
    )
    label = LABELS[name]
    try:
        out = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout + 15, check=False
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return CaseResult(
            name=name, label=label, error=f"HUNG: killed after {timeout + 15:.0f} s\n{stderr}"
        )
    finally:
        bu.remove_tree(case_dir)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(bu.RESULT_PREFIX)]
    if out.returncode != 0 or not lines:
        detail = (out.stderr or out.stdout).strip() or "(no output)"
        return CaseResult(name=name, label=label, error=f"child exited {out.returncode}\n{detail}")
    data = json.loads(lines[-1][len(bu.RESULT_PREFIX) :])
    return CaseResult(**data)


def child_main(args: argparse.Namespace) -> int:
    """The child's side: run one case, print its row as one JSON line."""
    # a hang shows where every thread was, before the parent's limit kills the process
    faulthandler.dump_traceback_later(args.child_timeout, exit=True)
    try:
        result = run_case(
            args.child, Path(args.dir), args.seconds, args.e2e_calls, args.drain_timeout
        )
    except BaseException:
        result = CaseResult(name=args.child, label=LABELS[args.child], error=traceback.format_exc())
    faulthandler.cancel_dump_traceback_later()
    bu.print_result(asdict(result))
    return 0


# ---------------------------------------------------------------------------------------------
# judging and the table


def _judge(results: list[CaseResult]) -> dict[str, float | None]:
    ok = {r.name: r for r in results if not r.error and r.calls_per_s}
    per_call = [ok[n].calls_per_s or 0.0 for n in PER_CALL_BASELINES if n in ok]
    best = max(per_call) if per_call else None
    batch = ok["sqlite_batch"].calls_per_s if "sqlite_batch" in ok else None
    for r in results:
        if r.name == "pmq_asyncio":
            r.target = f">= {ASYNC_MIN_CALLS_PER_S:,}/s and >= {ASYNC_MIN_RATIO:g}x best lib"
        elif r.name == "pmq_xa":
            versus = f"{batch:,.0f}" if batch else "?"
            r.target = f">= {XA_MIN_CALLS_PER_S:,}/s and > sqlite 1,000/COMMIT ({versus})"
        elif r.name == "pmq_e2e":
            r.target = f">= {E2E_MIN_CALLS_PER_S:,}/s, all executed"
        if r.error or not r.calls_per_s:
            if r.target and not r.skipped:
                r.met = False
            continue
        rate = r.calls_per_s
        r.ratio = rate / best if best else None
        if r.name == "pmq_asyncio":
            r.met = (
                None
                if r.ratio is None
                else (rate >= ASYNC_MIN_CALLS_PER_S and r.ratio >= ASYNC_MIN_RATIO)
            )
        elif r.name == "pmq_xa":
            r.met = None if batch is None else (rate >= XA_MIN_CALLS_PER_S and rate > batch)
        elif r.name == "pmq_e2e":
            r.met = rate >= E2E_MIN_CALLS_PER_S
    return {"best_per_call_lib_calls_per_s": best, "sqlite_batch_calls_per_s": batch}


def _fmt_us(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value / 1e3:.2f} ms" if value >= 1000 else f"{value:.0f} us"


def _extra_text(r: CaseResult) -> str:
    x = r.extra
    if r.skipped:
        return r.error or ""
    if r.error:
        last = [ln for ln in r.error.strip().splitlines() if ln.strip()][-1:] or ["?"]
        first = r.error.strip().splitlines()[0]
        return "ERROR: " + (first if first.startswith(("HUNG", "drain", "executed")) else last[0])
    parts: list[str] = []
    if "p50_us" in x:
        parts.append(f"p50 {_fmt_us(x['p50_us'])} p99 {_fmt_us(x['p99_us'])}")
    if "commit_p50_us" in x:
        parts.append(f"commit p50 {_fmt_us(x['commit_p50_us'])} p99 {_fmt_us(x['commit_p99_us'])}")
    if x.get("calls_per_fsync"):
        parts.append(f"{x['calls_per_fsync']:,.1f} calls/fsync")
    if r.name == "pmq_e2e":
        parts.append(
            f"{x['calls_executed']:,}/{x['calls_made']:,} executed; enqueue "
            f"{x['enqueue_s']:.2f} s, drain {x['drain_s']:.2f} s"
        )
    if "close_s" in x and x["close_s"] >= 0.5:
        parts.append(f"close {x['close_s']:.1f} s")
    return "; ".join(parts)


def _table(results: list[CaseResult]) -> str:
    rows = []
    for r in results:
        rate = bu.si(r.calls_per_s) if r.calls_per_s and not r.error else "-"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        rows.append([r.label, rate, ratio, r.target or "-", met, _extra_text(r)])
    return bu.render_table(
        ["case", "calls/s", "x best lib", "target", "met", "extra"], rows, align="lrrlll"
    )


# ---------------------------------------------------------------------------------------------
# main


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=None, help="time per case (default 3)")
    parser.add_argument("--quick", action="store_true", help="1 s per case, 20k end-to-end calls")
    parser.add_argument(
        "--cases",
        default=",".join(CASE_ORDER),
        help=f"comma-separated subset of: {', '.join(CASE_ORDER)}",
    )
    parser.add_argument(
        "--e2e-calls", type=int, default=None, help="end-to-end calls (default 100,000)"
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=60.0, help="cage.drain timeout (default 60 s)"
    )
    parser.add_argument("--dir", default=None, help="scratch base (default bench/.work)")
    parser.add_argument(
        "--no-install", action="store_true", help="do not pip install persist-queue"
    )
    bu.add_save_options(parser)
    bu.add_child_options(parser, child_timeout_s=600.0)
    args, case_set = bu.parse_run_args(parser, argv, CASE_ORDER)
    args.e2e_calls = args.e2e_calls or (20_000 if args.quick else 100_000)
    args.case_set = case_set
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        return child_main(args)
    want = [c for c in CASE_ORDER if c in args.case_set]
    pq_problem = ensure_persist_queue(not args.no_install) if "pq_ack" in want else None
    cage_problem = pmq_cage_problem() if any(c in PMQ_CASES for c in want) else None
    work = bu.make_work_dir(args.dir, "compare-")
    machine = bu.machine_info(work)
    print(
        f"durable queued calls, local: {machine['cpu_count']} CPUs ({machine['cpu_model']}), "
        f"Python {machine['python']}, {machine['fs_type']} on {machine['fs_source']} at {work}"
    )
    print(
        f'call: accounts.credit(12345, amount=10, memo="x" * 40), fsync before each ack; '
        f"{args.seconds:g} s per case\n"
    )
    if pq_problem:
        print(pq_problem)
    if cage_problem:
        print(f"pmq.Cage not available yet ({cage_problem})")
    activity_at_start, busy_at_start = bu.activity_at_start()
    results: list[CaseResult] = []
    settle()
    try:
        for name in want:
            skip = cage_problem if name in PMQ_CASES else pq_problem if name == "pq_ack" else None
            if skip:
                reason = "pmq.Cage not available yet" if name in PMQ_CASES else skip
                results.append(
                    CaseResult(name=name, label=LABELS[name], error=reason, skipped=True)
                )
                continue
            print(f"  {LABELS[name]} ...", end="", flush=True)
            result = run_child(name, work, args)
            results.append(result)
            if result.error:
                print(" ERROR: " + _extra_text(result).removeprefix("ERROR: "))
            else:
                print(f" {bu.si(result.calls_per_s or 0)} calls/s")
            settle()
    finally:
        bu.remove_tree(work)

    baselines = _judge(results)
    print()
    if baselines["best_per_call_lib_calls_per_s"]:
        print(
            f"best per-call durable rate of the compared libraries: "
            f"{baselines['best_per_call_lib_calls_per_s']:,.0f} calls/s (the 1.00x of the table)"
        )
    print(_table(results))
    print("\ndurability as configured:")
    for r in results:
        if r.durability:
            print(f"  {r.label}: {r.durability}")
    for r in results:
        if r.error and not r.skipped:
            print(f"\n--- {r.label}: error ---\n{r.error.rstrip()}")
    activity_at_end = bu.activity_at_end(busy_at_start)

    machine["persist_queue_version"] = bu.package_version("persist-queue")
    machine["msgpack_version"] = bu.package_version("msgpack")
    machine["sqlite_version"] = sqlite3.sqlite_version
    report: dict[str, Any] = {
        "kind": "pmq-local-comparison",
        "created": bu.timestamp(),
        "args": {k: v for k, v in vars(args).items() if k not in ("case_set", "child")},
        "machine": machine,
        "machine_activity": {"start": activity_at_start, "end": activity_at_end},
        "call": 'accounts.credit(12345, amount=10, memo="x" * 40) to "loopback_queue"',
        "pmq_cage_problem": cage_problem,
        "persist_queue_problem": pq_problem,
        **baselines,
        "results": [asdict(r) for r in results],
    }
    if not args.no_save:
        print(f"\nsaved {bu.save_report(report, args.json, 'local')}")
    return 1 if any(r.error and not r.skipped for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
