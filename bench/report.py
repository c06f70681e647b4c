"""Speed report of pmq's journal against the targets of the speed requirements (``make bench``).

Owns: one process run that measures every case of the requirements on the real disk, each
against a plain ``os.write`` + ``os.fdatasync`` loop measured in the same run, prints a table and
saves it as JSON in bench/results/. Must not: change the journal's settings away from what a user
gets (every journal is opened with its defaults plus the durability the case names), or print a
number it did not measure.

Invariants:
- Every payload is 100 bytes (the requirements' record size).
- The baseline ("plain loop") appends 100 bytes to a fresh, growing file and fdatasyncs after
  each write, single-threaded; it runs at the start and again at the end of the run, and the
  ratio uses both runs pooled (total records / total time), so drift shows instead of hiding.
- The raw bandwidth is 1 MiB ``os.write`` chunks into a fresh file followed by one fdatasync,
  timed including that fdatasync. It runs right before and right after the "never" cases (a VM
  disk's bandwidth drifts with its host's cache), twice each time, and the best run counts.
- Each case gets a fresh directory, a bounded time (``--seconds``) and is closed and deleted
  before the next one starts; ``os.sync()`` runs between cases so one case's writeback does not
  land in the next one's window.

Usage::

    .venv/bin/python bench/report.py                 # everything, ~3 s per case
    .venv/bin/python bench/report.py --quick         # ~1 s per case, 0.25 GiB reopen
    .venv/bin/python bench/report.py --skip-reopen --seconds 2
    .venv/bin/python bench/report.py --cases one,threads --no-save
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import _benchutil as bu
from _report_cases import (
    ASYNC_PRODUCERS,
    PAYLOAD_BYTES,
    THREAD_PRODUCERS,
    Result,
    case_asyncio,
    case_many,
    case_never,
    case_never_many,
    case_one,
    case_plain,
    case_raw,
    case_reopen,
    case_threads,
    import_journal,
    settle,
)

CASE_ORDER = ("plain", "one", "threads", "asyncio", "many", "raw", "never", "never_many", "reopen")

# ---------------------------------------------------------------------------------------------
# the table


def _fmt_us(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value / 1e3:.2f} ms" if value >= 1000 else f"{value:.0f} us"


def _extra_text(result: Result) -> str:
    x = result.extra
    parts: list[str] = []
    if result.error:
        return "ERROR: " + result.error.splitlines()[-1][:140]
    if result.name == "raw":
        runs = ", ".join(f"{v:.0f}" for v in x["runs_mb_per_s"])
        parts.append(f"best {x['mb_per_s']:.0f} MB/s (runs: {runs} MB/s)")
    if result.name == "reopen":
        for mode in ("warm", "cold"):
            if f"{mode}_open_s" in x:
                ok = "" if x[f"{mode}_next_seq_ok"] else " NEXT_SEQ WRONG"
                parts.append(
                    f"{mode} cache: {x[f'{mode}_mb_per_s']:.0f} MB/s "
                    f"({x[f'{mode}_open_s']:.2f} s){ok}"
                )
        parts.append(f"written at {bu.si(x['write_records_per_s'])} rec/s")
    if "fsyncs_per_s" in x and result.name not in ("never", "never_many", "reopen"):
        parts.append(f"{x['fsyncs_per_s']:,.0f} fsyncs/s")
    if "records_per_fsync" in x and result.name in ("threads", "asyncio"):
        batch = f"batch {x['records_per_fsync']:.1f}"
        if "stats_mean_batch" in x:
            batch += f" (stats: {x['stats_mean_batch']:.1f})"
        parts.append(batch)
    if "p50_us" in x:
        parts.append(f"p50 {_fmt_us(x['p50_us'])} p99 {_fmt_us(x['p99_us'])}")
    if "commit_p50_us" in x:
        parts.append(f"commit p50 {_fmt_us(x['commit_p50_us'])} p99 {_fmt_us(x['commit_p99_us'])}")
    if "journal_mb_per_s_incl_close" in x or "payload_mb_per_s_incl_close" in x:
        key = "journal" if "journal_mb_per_s_incl_close" in x else "payload"
        text = f"{x[f'{key}_mb_per_s_incl_close']:.0f} MB/s {key} incl. close"
        if "fraction_of_raw_bandwidth" in x:
            text += f" = {x['fraction_of_raw_bandwidth']:.0%} of best raw"
        if "fraction_of_raw_first_run" in x:
            text += f", {x['fraction_of_raw_first_run']:.0%} of first raw runs"
        parts.append(text)
    if x.get("durable_seq_covers_all") is False:
        parts.append("DURABLE_SEQ BEHIND")
    return "; ".join(parts)


def _table(results: list[Result]) -> str:
    rows = []
    for r in results:
        rate = bu.si(r.records_per_s) if r.records_per_s is not None and not r.error else "-"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        rows.append([r.label, rate, ratio, r.target or "-", met, _extra_text(r)])
    return bu.render_table(
        ["case", "records/s", "x plain", "target", "met", "extra"], rows, align="lrrlll"
    )


def _judge(
    results: list[Result],
    baseline_rate: float | None,
    raw_mb: float | None,
    raw_first_mb: float | None,
) -> None:
    for r in results:
        on_disk = r.extra.get("journal_mb_per_s_incl_close")
        if raw_mb and on_disk is not None:
            r.extra["fraction_of_raw_bandwidth"] = on_disk / raw_mb
        if raw_first_mb and on_disk is not None:
            r.extra["fraction_of_raw_first_run"] = on_disk / raw_first_mb
        if r.error or r.records_per_s is None:
            continue
        if baseline_rate and r.name not in ("plain", "raw", "reopen"):
            r.ratio = r.records_per_s / baseline_rate
        elif r.name == "plain":
            r.ratio = r.records_per_s / baseline_rate if baseline_rate else None
        if r.target_kind == "ratio" and r.ratio is not None and r.target_value is not None:
            r.met = r.ratio >= r.target_value
        elif r.target_kind == "records_per_s" and r.target_value is not None:
            r.met = r.records_per_s >= r.target_value


# ---------------------------------------------------------------------------------------------
# main


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=None, help="time per case (default 3)")
    parser.add_argument(
        "--quick", action="store_true", help="1 s per case, 128 MiB raw write, 0.25 GiB reopen"
    )
    parser.add_argument("--skip-reopen", action="store_true", help="leave out the reopen case")
    parser.add_argument("--reopen-gib", type=float, default=None, help="reopen size (default 1)")
    parser.add_argument(
        "--reopen-write-cap",
        type=float,
        default=60.0,
        help="stop writing the reopen journal after this many seconds (default 60)",
    )
    parser.add_argument("--raw-mib", type=int, default=None, help="raw write size (default 256)")
    parser.add_argument(
        "--cases",
        default=",".join(CASE_ORDER),
        help=f"comma-separated subset of: {', '.join(CASE_ORDER)}",
    )
    parser.add_argument("--dir", default=None, help="scratch base (default bench/.work)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--no-save", action="store_true", help="do not write the JSON file")
    parser.add_argument("--json", default=None, help="JSON path (default bench/results/...)")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (1.0 if args.quick else 3.0)
    args.reopen_gib = args.reopen_gib or (0.25 if args.quick else 1.0)
    args.raw_mib = args.raw_mib or (128 if args.quick else 256)
    args.case_set = {c.strip() for c in args.cases.split(",") if c.strip()}
    unknown = args.case_set - set(CASE_ORDER)
    if unknown:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    if args.skip_reopen:
        args.case_set.discard("reopen")
    return args


def _run(results: list[Result], name: str, label: str, fn: Callable[[], Result]) -> Result:
    print(f"  {label} ...", end="", flush=True)
    try:
        result = fn()
    except Exception:
        result = Result(name=name, label=label, error=traceback.format_exc())
    results.append(result)
    if result.error:
        print(" ERROR: " + result.error.strip().splitlines()[-1])
    elif "mb_per_s" in result.extra:
        print(f" {result.extra['mb_per_s']:,.0f} MB/s")
    elif "cold_mb_per_s" in result.extra or "warm_mb_per_s" in result.extra:
        mb = result.extra.get("cold_mb_per_s", result.extra.get("warm_mb_per_s"))
        print(f" {mb:,.0f} MB/s")
    elif result.records_per_s is not None:
        print(f" {bu.si(result.records_per_s)} records/s")
    else:
        print(" done")
    settle()
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    want = args.case_set
    try:
        journal_cls = import_journal()
    except ImportError as exc:
        print(f"pmq._journal cannot be imported ({exc}); build it first: make build")
        return 2
    work = bu.make_work_dir(args.dir, "report-")
    machine = bu.machine_info(work)
    print(
        f"pmq journal speed report: {machine['cpu_count']} CPUs ({machine['cpu_model']}), "
        f"Python {machine['python']}, {machine['fs_type']} on {machine['fs_source']} "
        f"at {work}"
    )
    print(f"{PAYLOAD_BYTES}-byte payloads, {args.seconds:g} s per case\n")
    activity_at_start = bu.machine_activity()
    busy_at_start = bu.busy_warning(activity_at_start)
    if busy_at_start:
        print(busy_at_start + "\n")
    results: list[Result] = []
    seconds = args.seconds

    def step(name: str, label: str, fn: Callable[[], Result]) -> None:
        if name in want:
            _run(results, name, label, fn)

    settle()
    try:
        step(
            "plain",
            "plain write+fdatasync loop (start)",
            lambda: case_plain(work, seconds, "plain loop (start)"),
        )
        step("one", "always, 1 producer", lambda: case_one(journal_cls, work, seconds))
        step(
            "threads",
            f"always, {THREAD_PRODUCERS} threads",
            lambda: case_threads(journal_cls, work, seconds),
        )
        step(
            "asyncio",
            f"always, {ASYNC_PRODUCERS} asyncio producers",
            lambda: case_asyncio(journal_cls, work, seconds),
        )
        step("many", "always, append_many", lambda: case_many(journal_cls, work, seconds))
        # the disk's bandwidth drifts (a VM's host cache): measure it right before and after
        # the bandwidth-bound cases; the best run is the reference
        step(
            "raw",
            "raw sequential write (before never)",
            lambda: case_raw(work, args.raw_mib, "before never"),
        )
        step("never", "never, append", lambda: case_never(journal_cls, work, seconds))
        step(
            "never_many", "never, append_many", lambda: case_never_many(journal_cls, work, seconds)
        )
        step(
            "raw",
            "raw sequential write (after never)",
            lambda: case_raw(work, args.raw_mib, "after never"),
        )
        step(
            "plain",
            "plain write+fdatasync loop (end)",
            lambda: case_plain(work, seconds, "plain loop (end)"),
        )
        if "reopen" in want:
            free = shutil.disk_usage(work).free
            need = int(args.reopen_gib * (1 << 30) * 2) + (1 << 30)
            if free < need:
                results.append(
                    Result(
                        name="reopen",
                        label="reopen",
                        target="report MB/s",
                        error=f"skipped: {free >> 20} MiB free, need {need >> 20} MiB",
                    )
                )
            else:
                step(
                    "reopen",
                    f"reopen {args.reopen_gib:g} GiB",
                    lambda: case_reopen(journal_cls, work, args.reopen_gib, args.reopen_write_cap),
                )
    finally:
        if not args.keep:
            bu.remove_tree(work)

    plains = [r for r in results if r.name == "plain" and not r.error and r.records]
    baseline_rate = (
        sum(p.records for p in plains) / sum(p.seconds for p in plains) if plains else None
    )
    raws = [r for r in results if r.name == "raw" and not r.error]
    raw_mb_per_s = max((r.extra["mb_per_s"] for r in raws), default=None)
    firsts = [r.extra["runs_mb_per_s"][0] for r in raws]
    raw_first_mb_per_s = sum(firsts) / len(firsts) if firsts else None
    _judge(results, baseline_rate, raw_mb_per_s, raw_first_mb_per_s)
    print()
    if baseline_rate:
        print(f"plain loop, pooled: {baseline_rate:,.0f} records/s (the 1.00x of the table)")
    if raw_mb_per_s:
        print(
            f"raw sequential write: best run {raw_mb_per_s:,.0f} MB/s, first runs (after a "
            f"pause) {raw_first_mb_per_s or 0:,.0f} MB/s on average (MB = 10^6 bytes)"
        )
    print(_table(results))
    activity_at_end = bu.machine_activity()
    busy_at_end = bu.busy_warning(activity_at_end)
    for warning in dict.fromkeys(w for w in (busy_at_start, busy_at_end) if w):
        print("\n" + warning)

    report = {
        "kind": "pmq-journal-speed-report",
        "created": bu.timestamp(),
        "args": {k: v for k, v in vars(args).items() if k != "case_set"},
        "machine": machine,
        "machine_activity": {"start": activity_at_start, "end": activity_at_end},
        "payload_bytes": PAYLOAD_BYTES,
        "baseline_records_per_s": baseline_rate,
        "raw_mb_per_s": raw_mb_per_s,
        "raw_first_run_mb_per_s": raw_first_mb_per_s,
        "results": [asdict(r) for r in results],
    }
    if not args.no_save:
        path = Path(args.json) if args.json else bu.RESULTS_DIR / f"journal-{bu.timestamp()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        with contextlib.suppress(ValueError):
            path = path.relative_to(Path.cwd())
        print(f"\nsaved {path}")
    return 1 if any(r.error and not r.error.startswith("skipped") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
