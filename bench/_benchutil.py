"""Helpers shared by the journal benchmarks and the demo: scratch directories and machine facts.

Owns: where scratch journals live (on the real disk, never tmpfs), the description of the machine
a result was measured on, small formatting helpers, and what the comparison runners
(compare_local.py, compare_remote.py) share: their common options, the line a child answers
with, the busy-machine warnings and the saved report. Must not: import pmq (the demo's child
process and the report import pmq themselves, so a broken build fails where it is used).

Invariants:
- Scratch directories are created under ``bench/.work`` (same file system as the repository)
  unless the caller names another base, and a base on tmpfs/ramfs is refused: fsync is a no-op
  there, so every durable figure would be fiction.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DEFAULT_WORK_BASE = BENCH_DIR / ".work"
RESULTS_DIR = BENCH_DIR / "results"

# File systems on which fdatasync does not reach a device: results there mean nothing.
MEMORY_FILE_SYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"})
# A runner's child prints its result as one line: this prefix, then JSON.
RESULT_PREFIX = "RESULT "


def mount_of(path: str | os.PathLike[str]) -> dict[str, str]:
    """Return the mount that holds ``path``: its mount point, file-system type and source.

    Reads /proc/self/mountinfo (Linux); elsewhere every field is "unknown".
    """
    real = os.path.realpath(path)
    best = {"mount_point": "unknown", "fs_type": "unknown", "source": "unknown"}
    best_len = -1
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
            lines = mountinfo.read().splitlines()
    except OSError:
        return best
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        rest = right.split()
        if len(fields) < 5 or len(rest) < 2:
            continue
        mount_point = fields[4].replace("\\040", " ")
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > best_len:
            best = {"mount_point": mount_point, "fs_type": rest[0], "source": rest[1]}
            best_len = len(mount_point)
    return best


def make_work_dir(base: str | os.PathLike[str] | None, prefix: str) -> Path:
    """Create a fresh scratch directory under ``base`` (default bench/.work) and return it.

    Raises:
        SystemExit: the base is on a memory file system, where fsync proves nothing.
    """
    base_path = Path(base) if base is not None else DEFAULT_WORK_BASE
    base_path.mkdir(parents=True, exist_ok=True)
    fs_type = mount_of(base_path)["fs_type"]
    if fs_type in MEMORY_FILE_SYSTEMS:
        raise SystemExit(
            f"{base_path} is on {fs_type}: fsync is a no-op there, so durable figures would be "
            "meaningless. Choose a directory on a real disk (--dir)."
        )
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base_path))


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete a scratch directory, ignoring one that is already gone."""
    shutil.rmtree(path, ignore_errors=True)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None where it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info(work_dir: str | os.PathLike[str]) -> dict[str, object]:
    """Describe the machine, the interpreter and the disk that ``work_dir`` is on."""
    mount = mount_of(work_dir)
    usage = shutil.disk_usage(work_dir)
    try:
        usable_cpus: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cpus = None
    status = _git("status", "--porcelain", "--", "src")
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "cpu_model": _cpu_model(),
        "mem_total_bytes": _mem_total_bytes(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "work_dir": str(work_dir),
        "fs_type": mount["fs_type"],
        "fs_source": mount["source"],
        "mount_point": mount["mount_point"],
        "disk_free_bytes": usage.free,
        "pmq_version": package_version("pmq"),
        "xxhash_version": package_version("xxhash"),
        "cython_version": package_version("Cython"),
        "loadavg": load_average(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_src_dirty": None if status is None else bool(status),
    }


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the OS does not tell."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpu_times() -> list[int] | None:
    try:
        with open("/proc/stat", encoding="utf-8") as stat:
            return [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def machine_activity(seconds: float = 0.5) -> dict[str, float] | None:
    """What the rest of the machine does while this process sleeps for ``seconds``.

    Returns the fraction of CPU time that was busy and the fraction spent waiting for I/O
    (from /proc/stat, Linux only; None elsewhere).
    """
    before = _cpu_times()
    time.sleep(seconds)
    after = _cpu_times()
    if before is None or after is None or len(after) < 5:
        return None
    delta = [a - b for a, b in zip(after, before, strict=False)]
    total = sum(delta[:8]) or 1
    idle, iowait = delta[3], delta[4]
    return {"busy": (total - idle - iowait) / total, "iowait": iowait / total}


def busy_warning(activity: dict[str, float] | None) -> str | None:
    """A warning when other work was running: fsync figures then measure the contention too."""
    if activity is None or (activity["busy"] < 0.2 and activity["iowait"] < 0.2):
        return None
    return (
        f"WARNING: while this run was idle the machine was {activity['busy']:.0%} busy and "
        f"{activity['iowait']:.0%} waiting for I/O: something else is running, so these figures "
        "include the contention"
    )


def timestamp() -> str:
    """Local time as ``YYYYmmdd-HHMMSS``, for result file names."""
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def percentile(sorted_values: list[int] | list[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank) of an already sorted, non-empty list."""
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return float(sorted_values[index])


def latency_summary(samples_ns: list[int], prefix: str = "") -> dict[str, float]:
    """p50, p99 and max of latencies given in nanoseconds, in microseconds (sorts in place)."""
    if not samples_ns:
        return {}
    samples_ns.sort()
    return {
        f"{prefix}p50_us": percentile(samples_ns, 0.50) / 1e3,
        f"{prefix}p99_us": percentile(samples_ns, 0.99) / 1e3,
        f"{prefix}max_us": samples_ns[-1] / 1e3,
    }


def si(value: float, unit: str = "") -> str:
    """Format ``value`` compactly: 1234 -> '1,234', 1520000 -> '1.52 M'."""
    if value >= 10_000_000:
        return f"{value / 1e6:,.1f} M{unit}"
    if value >= 1_000_000:
        return f"{value / 1e6:,.2f} M{unit}"
    if value >= 100:
        return f"{value:,.0f}{' ' + unit if unit else ''}"
    return f"{value:,.2f}{' ' + unit if unit else ''}"


def render_table(headers: list[str], rows: list[list[str]], align: str = "") -> str:
    """Render a plain-text table with a rule under the header.

    Args:
        headers: column titles.
        rows: cells, already formatted as text.
        align: one letter per column, "l" or "r" (default "l").
    """
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: list[str]) -> str:
        padded = [
            cell.rjust(widths[i]) if align[i : i + 1] == "r" else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(padded).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in rows)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# the comparison runners: compare_local.py and compare_remote.py


def add_save_options(parser: argparse.ArgumentParser) -> None:
    """--no-save and --json, which mean the same in every runner (see ``save_report``)."""
    parser.add_argument("--no-save", action="store_true", help="do not write the JSON file")
    parser.add_argument("--json", default=None, help="JSON path (default bench/results/...)")


def add_child_options(parser: argparse.ArgumentParser, child_timeout_s: float) -> None:
    """--child and --child-timeout: hidden, because only the runner itself passes them, to the
    copy of itself it starts for each case (``child_command``)."""
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--child-timeout", type=float, default=child_timeout_s, help=argparse.SUPPRESS
    )


def parse_run_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, known_cases: Iterable[str]
) -> tuple[argparse.Namespace, set[str]]:
    """Parse, fill in --seconds (1 s with --quick, else 3 s) and check --cases.

    Returns the options and the set of names --cases listed; an unknown name is a usage error
    before anything is installed or measured.
    """
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (1.0 if args.quick else 3.0)
    wanted = {c.strip() for c in args.cases.split(",") if c.strip()}
    unknown = wanted - set(known_cases)
    if unknown:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    return args, wanted


def child_command(script: str, role: str, *options: str) -> list[str]:
    """The command that runs ``script`` again, as ``--child ROLE``.

    Each case gets a fresh interpreter: one case's threads, caches and open files cannot slow
    the next, and a child that hangs can be killed without losing the run.
    """
    return [sys.executable, str(Path(script).resolve()), "--child", role, *options]


def print_result(result: dict[str, Any]) -> None:
    """A child's answer to its runner, on one stdout line after ``RESULT_PREFIX``: the runner
    reads only such lines, so nothing else the child prints can be taken for its result."""
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)


def activity_at_start() -> tuple[dict[str, float] | None, str | None]:
    """Sample the machine before the first case; print the busy warning, if any, at once.

    Printed now so that whoever watches a long run learns early that its figures will include
    someone else's load. Returns the sample (for the report) and the warning.
    """
    activity = machine_activity()
    warning = busy_warning(activity)
    if warning:
        print(warning + "\n")
    return activity, warning


def activity_at_end(warning_at_start: str | None) -> dict[str, float] | None:
    """Sample the machine after the last case; print the busy warnings under the table.

    Under the table is where the figures are read; a warning from start and end alike is
    printed once. Returns the sample, for the report.
    """
    activity = machine_activity()
    warnings = (warning_at_start, busy_warning(activity))
    for warning in dict.fromkeys(w for w in warnings if w):
        print("\n" + warning)
    return activity


def save_report(report: dict[str, Any], path: str | None, kind: str) -> Path:
    """Write ``report`` as JSON to ``path``, or to bench/results/KIND-<timestamp>.json.

    Returns the path to print: relative to the current directory where it can be, so it can
    be pasted into the next command.
    """
    out = Path(path) if path else RESULTS_DIR / f"{kind}-{timestamp()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    with contextlib.suppress(ValueError):
        out = out.relative_to(Path.cwd())
    return out
