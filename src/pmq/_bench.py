"""``pmq bench``: queued calls end to end between two local cage processes, in a table.

Rows, each with a fresh producer process (cage "producer") and consumer process (cage
"consumer", listening on 127.0.0.1), fresh data directories and pmq's defaults (fsync on both
cages before each acknowledgement):
- throughput, transactions of 1,000: the producer makes ``--calls`` calls in transactions;
- throughput, aexecute from 1,000 asyncio tasks: the same number of calls, one ``await`` each;
- latency at 1,000 and at 10,000 calls/s: ``execute`` from a thread pool on an open-loop schedule
  (a call is made when the schedule says, whatever is still unacknowledged) for ``--seconds``
  (at most ``--calls`` calls).
Every call is ``accounts.credit(12345, amount=10, memo="x" * 40, sent=time.time())``; the
consumer's handler records ``now - sent`` and counts distinct call ids
(``pmq.current_call().call_id``). Throughput is calls / (first call made -> the last distinct
call run on the consumer); latency p50/p99 is ``now - sent`` at the handler.

Owns: the rows, their worker roles (this module again with the hidden ``--role``), the progress
bar, the table, the JSON, and the small process helpers that pmq._demo uses too (worker lines,
ports, tables, the scratch directory). The picture (``--plot``, and ``--from-json`` to redraw a
saved run, this command's or bench/compare_remote.py's) is drawn by pmq._plot. Must not: measure
other systems (that is bench/compare_remote.py) or use pmq's internals (workers use the public
API only).

Invariants: a row counts as measured only when the consumer ran exactly the calls the producer
made (duplicates are counted apart); a row that fails says why in the table, and the exit status
is 1. Workers exit when their stdin closes, so a dead parent leaves nothing running.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import faulthandler
import importlib
import json
import os
import platform
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pmq
from pmq._plot import plot

HOST = "127.0.0.1"
BATCH = 1_000  # calls per transaction
ASYNC_TASKS = 1_000  # asyncio tasks calling aexecute
LATENCY_THREADS = 64  # threads of the open-loop producer
LATENCY_RATES = (1_000, 10_000)
DEFAULT_CALLS = 100_000
DEFAULT_SECONDS = 3.0
STALL_S = 30.0  # a row whose consumer runs nothing new for this long has failed
READY_S = 60.0  # a worker that is not ready after this long has failed
STOP_S = 10.0  # a worker that has not exited this long after "stop" is killed
WORKER_LIMIT_S = 900.0  # a worker exits by itself after this long (with its stacks)
ACCOUNT, AMOUNT, MEMO = 12345, 10, "x" * 40


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    name: str  # "xa", "async", "lat1k", "lat10k"
    label: str
    rate: float = 0.0  # latency rows: calls/s offered


ROWS = (
    Row("xa", f"throughput, transactions of {BATCH:,}"),
    Row("async", f"throughput, aexecute from {ASYNC_TASKS:,} tasks"),
    *(Row(f"lat{rate // 1000}k", f"latency at {rate:,} calls/s", rate) for rate in LATENCY_RATES),
)


@dataclass
class Plan:
    """What a worker is told (JSON on its command line)."""

    row: str
    calls: int
    rate: float
    port: int
    data_dir: str


# ---------------------------------------------------------------------------------------------
# process helpers, shared with pmq._demo


def emit(kind: str, data: object = None) -> None:
    """One line to the parent, in one write (lines of several threads never mix)."""
    line = kind if data is None else f"{kind} {json.dumps(data)}"
    os.write(1, (line + "\n").encode())


def watch_stdin(commands: dict[str, threading.Event], grace_s: float = 0.0) -> None:
    """Set the event of each command the parent writes. When stdin closes (the parent is done,
    or gone), set them all and exit ``grace_s`` seconds later unless the worker ended first."""
    for line in sys.stdin:
        event = commands.get(line.strip())
        if event is not None:
            event.set()
    if grace_s:
        for event in commands.values():
            event.set()
        time.sleep(grace_s)
    os._exit(5)


def wait_port(port: int, timeout: float) -> None:
    """Wait until something accepts TCP connections on HOST:port.

    Raises:
        TimeoutError: nothing did within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing accepts connections on {HOST}:{port} after "
                                   f"{timeout:g} s") from None
            time.sleep(0.02)


def free_port() -> int:
    """A TCP port on HOST that nothing listens on now (the parent hands it to a worker)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A plain text table: ``align`` has one "l" or "r" per column."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                         for c, w, a in zip(cells, widths, align, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths).rstrip()
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def fs_type(path: Path) -> str:
    """The file system type under ``path`` ("?" when /proc/mounts does not say)."""
    best, kind = "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for entry in mounts:
            _, mount, kind_here, *_ = [*entry.split(), "", "", ""]
            inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, kind = mount, kind_here
    return kind


def scratch_base() -> Path:
    """The temporary directory, unless it is tmpfs (fsync is free there): /var/tmp then."""
    base = Path(tempfile.gettempdir()).resolve()
    if fs_type(base) == "tmpfs" and os.access("/var/tmp", os.W_OK):
        return Path("/var/tmp")
    return base


# ---------------------------------------------------------------------------------------------
# the consumer


class Tally:
    """Distinct calls run, duplicates and latencies, from the consumer's handler threads."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.lock = threading.Lock()
        # A dict of str and a typed array: the garbage collector tracks neither (a set or a list
        # of hundreds of thousands would cost each of its full collections milliseconds, and
        # those would be charged to pmq).
        self.seen: dict[str, None] = {}
        self.latencies = array.array("d")
        self.duplicates = 0
        self.finish: float | None = None
        self.done = threading.Event()

    def record(self, call_id: str, sent: float) -> None:
        now = time.time()
        with self.lock:
            if call_id in self.seen:
                self.duplicates += 1
                return
            self.seen[call_id] = None
            self.latencies.append(now - sent)
            if len(self.seen) >= self.target and self.finish is None:
                self.finish = now
                self.done.set()


class Accounts:
    """The consumer's exposed module."""

    def __init__(self, tally: Tally) -> None:
        self._tally = tally

    def credit(self, account: int, amount: int, memo: str = "", sent: float = 0.0) -> None:
        info = pmq.current_call()
        assert info is not None
        self._tally.record(info.call_id, sent)


def _consumer(plan: Plan, stop: threading.Event) -> int:
    tally = Tally(plan.calls)
    cage = pmq.Cage("consumer", data_dir=Path(plan.data_dir) / "consumer",
                    listen=f"{HOST}:{plan.port}", expose={"accounts": Accounts(tally)})
    cage.start()
    emit("ready")
    seen, progress = 0, time.monotonic()
    while not tally.done.wait(0.05):
        with tally.lock:
            count = len(tally.seen)
        if count != seen:
            seen, progress = count, time.monotonic()
            emit("progress", count)
        elif time.monotonic() - progress > STALL_S:
            break
    with tally.lock:
        latencies = sorted(tally.latencies)
        result = {"distinct": len(tally.seen), "duplicates": tally.duplicates,
                  "finish": tally.finish, **_percentiles(latencies)}
    emit("progress", result["distinct"])
    emit("result", result)
    # The parent stops the producer first: a producer whose peer is gone keeps reconnecting,
    # and there cage.stop() can hang (a cancellation lost in asyncio.wait_for on Python 3.11).
    stop.wait()
    cage.stop()
    return 0


def _percentiles(sorted_s: list[float]) -> dict[str, float]:
    if not sorted_s:
        return {}
    return {"p50_ms": sorted_s[len(sorted_s) // 2] * 1e3,
            "p99_ms": sorted_s[min(len(sorted_s) - 1, int(len(sorted_s) * 0.99))] * 1e3,
            "max_ms": sorted_s[-1] * 1e3}


# ---------------------------------------------------------------------------------------------
# the producer


def _producer(plan: Plan, stop: threading.Event) -> int:
    data_dir, peers = Path(plan.data_dir) / "producer", {"consumer": f"{HOST}:{plan.port}"}
    if plan.row == "async":
        asyncio.run(_produce_async(plan, data_dir, peers, stop))
        return 0
    cage = pmq.Cage("producer", data_dir=data_dir, peers=peers)
    cage.start()
    try:
        emit("ready")
        first = time.time()
        lags: list[float] = []
        if plan.row == "xa":
            made = 0
            while made < plan.calls:
                count = min(BATCH, plan.calls - made)
                stamp = time.time()
                with cage.transaction() as xa:
                    target = xa.on("consumer_queue")
                    for _ in range(count):
                        target.accounts.credit(ACCOUNT, amount=AMOUNT, memo=MEMO, sent=stamp)
                made += count
        else:
            lags = _open_loop(cage, plan)
        lags.sort()
        emit("result", {"first": first, "last": time.time(), "calls": plan.calls,
                        "lag_p99_ms": lags[int(len(lags) * 0.99)] * 1e3 if lags else None})
        stop.wait()  # keep the cage up: it delivers what the consumer has not acknowledged yet
    finally:
        cage.stop()
    return 0


def _open_loop(cage: pmq.Cage, plan: Plan) -> list[float]:
    """Make ``plan.calls`` calls at ``plan.rate`` from a pool; return how late each one was."""
    lags: list[float] = []
    errors: list[BaseException] = []
    execute = cage.execute

    def job(due: float) -> None:
        stamp = time.time()
        lags.append(stamp - due)
        try:
            execute.on("consumer_queue").accounts.credit(ACCOUNT, amount=AMOUNT, memo=MEMO,
                                                         sent=stamp)
        except BaseException as exc:  # reported after the schedule
            errors.append(exc)

    interval = 1.0 / plan.rate
    with ThreadPoolExecutor(max_workers=LATENCY_THREADS) as pool:
        t0 = time.time() + 0.01
        i = 0
        while i < plan.calls and not errors:
            due = min(plan.calls, int((time.time() - t0) / interval) + 1)
            while i < due:
                pool.submit(job, t0 + i * interval)
                i += 1
            time.sleep(max(0.0, t0 + i * interval - time.time()))
    if errors:
        raise errors[0]
    return lags


async def _produce_async(plan: Plan, data_dir: Path, peers: dict[str, str],
                         stop: threading.Event) -> None:
    async with pmq.Cage("producer", data_dir=data_dir, peers=peers) as cage:
        emit("ready")
        left = plan.calls
        aexecute = cage.aexecute

        async def producer() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await aexecute.on("consumer_queue").accounts.credit(
                    ACCOUNT, amount=AMOUNT, memo=MEMO, sent=time.time())

        first = time.time()
        async with asyncio.TaskGroup() as group:
            for _ in range(ASYNC_TASKS):
                group.create_task(producer())
        emit("result", {"first": first, "last": time.time(), "calls": plan.calls})
        await asyncio.to_thread(stop.wait)


# ---------------------------------------------------------------------------------------------
# the parent


class RowFailed(Exception):
    """A row could not be measured: the message says why."""


class Worker:
    """A producer or consumer process; its stdout lines arrive as (kind, data) events."""

    def __init__(self, role: str, plan: Plan, work: Path) -> None:
        self.role = role
        self.stderr_path = work / f"{plan.row}-{role}.stderr"
        command = [sys.executable, "-m", "pmq._bench", "--role", role, "--plan",
                   json.dumps(asdict(plan))]
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=stderr, text=True, bufsize=1)
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            kind, _, rest = line.rstrip("\n").partition(" ")
            self.events.put((kind, json.loads(rest) if rest else None))
        self.events.put(("eof", None))

    def next(self, timeout: float) -> tuple[str, Any]:
        """The next event; RowFailed when the worker exits or says nothing for ``timeout``."""
        try:
            kind, data = self.events.get(timeout=timeout)
        except queue.Empty:
            raise RowFailed(f"the {self.role} said nothing for {timeout:g} s"
                            + self.stderr_tail()) from None
        if kind == "eof":
            self.proc.wait()
            raise RowFailed(f"the {self.role} exited with status {self.proc.returncode}"
                            + self.stderr_tail())
        return kind, data

    def expect(self, wanted: str, timeout: float) -> Any:
        while True:
            kind, data = self.next(timeout)
            if kind == wanted:
                return data

    def stderr_tail(self) -> str:
        text = self.stderr_path.read_text(errors="replace").strip() if \
            self.stderr_path.exists() else ""
        return f": {text.splitlines()[-1]}" if text else ""

    def close(self) -> None:
        """Tell it to stop (close stdin) and wait; kill it if it does not exit."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            print(f"\nnote: the {self.role} did not stop within {STOP_S:g} s; killed it",
                  file=sys.stderr)
            self.proc.kill()
            self.proc.wait()


class Counter:
    """Progress without click: a counter on stderr, updated in place on a terminal; elsewhere
    (a log, a pipe) one line when the row ends."""

    def __init__(self, length: int, label: str) -> None:
        self.length, self.label, self.count = length, label, 0
        self._tty = sys.stderr.isatty()
        self._started = time.monotonic()

    def __enter__(self) -> Counter:
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = time.monotonic() - self._started
        sys.stderr.write(f"{chr(13) if self._tty else ''}{self.label} {self.count:,}/"
                         f"{self.length:,} calls run ({elapsed:.1f} s)\n")
        sys.stderr.flush()

    def update(self, steps: int) -> None:
        self.count += steps
        if self._tty:
            sys.stderr.write(f"\r{self.label} {self.count:,}/{self.length:,}")
            sys.stderr.flush()


def _progressbar(length: int, label: str) -> Any:
    """click's progress bar on a terminal (when click is installed), else a Counter."""
    sys.stdout.flush()
    if not sys.stderr.isatty():
        return Counter(length, label)
    try:
        click = importlib.import_module("click")
    except ImportError:
        return Counter(length, label)
    return click.progressbar(length=length, label=label, file=sys.stderr, show_eta=False,
                             show_pos=True, width=30)


def run_row(row: Row, calls: int, work: Path) -> dict[str, Any]:
    """Measure one row: consumer first (ready, port open), then the producer."""
    row_dir = work / row.name
    row_dir.mkdir()
    plan = Plan(row.name, calls, row.rate, free_port(), str(row_dir))
    consumer = producer = None
    try:
        consumer = Worker("consumer", plan, work)
        consumer.expect("ready", READY_S)
        try:
            wait_port(plan.port, READY_S)
        except TimeoutError as exc:
            raise RowFailed(str(exc)) from None
        producer = Worker("producer", plan, work)
        producer.expect("ready", READY_S)
        done = 0
        with _progressbar(calls, f"  {row.label:<38}") as bar:
            while True:
                kind, data = consumer.next(STALL_S + 5.0)
                if kind == "progress":
                    bar.update(int(data) - done)
                    done = int(data)
                elif kind == "result":
                    cons: dict[str, Any] = data
                    break
        prod: dict[str, Any] = producer.expect("result", STALL_S)
    finally:
        for worker in (producer, consumer):
            if worker is not None:
                worker.close()
    if cons["distinct"] != calls:
        raise RowFailed(f"the consumer ran {cons['distinct']:,} distinct calls of {calls:,} "
                        f"(nothing new for {STALL_S:g} s)")
    seconds = cons["finish"] - prod["first"]
    return {"row": row.name, "label": row.label, "calls": calls, "seconds": seconds,
            "calls_per_s": calls / seconds if seconds > 0 else None,
            "duplicates": cons["duplicates"], "offered_per_s": row.rate or None,
            "p50_ms": cons.get("p50_ms"), "p99_ms": cons.get("p99_ms"),
            "max_ms": cons.get("max_ms"), "producer_lag_p99_ms": prod.get("lag_p99_ms")}


def _note(r: dict[str, Any]) -> str:
    notes = [f"{r['duplicates']:,} duplicates"] if r["duplicates"] else []
    lag = r.get("producer_lag_p99_ms")
    if lag is not None and lag > 10:
        notes.append(f"the producer fell behind the schedule (p99 {lag:,.0f} ms late)")
    return "; ".join(notes)


def _table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        if r.get("error"):
            rows.append([r["label"], "-", "-", "-", "-", "-", "FAILED: " + r["error"][:70]])
            continue
        latency = r["offered_per_s"] is not None
        rows.append([r["label"], f"{r['calls']:,}", f"{r['seconds']:.2f}",
                     f"{r['calls_per_s']:,.0f}",
                     f"{r['p50_ms']:.2f}" if latency else "-",
                     f"{r['p99_ms']:.2f}" if latency else "-",
                     _note(r)])
    return render_table(["", "calls", "seconds", "calls/s", "p50 ms", "p99 ms", ""], rows,
                        "lrrrrrl")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pmq bench", description="Queued calls end to end between two local cage "
        "processes: throughput and latency.")
    parser.add_argument("--calls", type=int, default=DEFAULT_CALLS,
                        help=f"calls per throughput row, and at most per latency row "
                             f"(default {DEFAULT_CALLS:,})")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                        help=f"length of each latency row (default {DEFAULT_SECONDS:g})")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png",
                        help='draw the results (needs matplotlib: pip install "pmq[plot]")')
    parser.add_argument("--from-json", metavar="FILE",
                        help="measure nothing: draw the run saved in FILE (by --json, or by "
                             "bench/compare_remote.py, which measures other systems too) "
                             "with --plot")
    parser.add_argument("--dir", help="where to make the scratch directory")
    parser.add_argument("--role", choices=("producer", "consumer"), help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.calls < 1 or args.seconds <= 0:
        parser.error("--calls and --seconds must be positive")
    if args.from_json and not args.plot:
        parser.error("--from-json draws a saved run: give --plot FILE.png too")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every row and print the table (or, with the hidden ``--role``, be one worker).

    Returns:
        0 when every row was measured, 1 when one failed.
    """
    args = _parse(argv)
    if args.role is not None:
        faulthandler.dump_traceback_later(WORKER_LIMIT_S, exit=True)
        if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>`: where is it stuck?
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        stop = threading.Event()
        threading.Thread(target=watch_stdin, args=({"stop": stop}, READY_S),
                         daemon=True).start()
        plan = Plan(**json.loads(args.plan))
        return _consumer(plan, stop) if args.role == "consumer" else _producer(plan, stop)
    if args.from_json:
        return _replot(args.from_json, args.plot)
    base = Path(args.dir) if args.dir else scratch_base()
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pmq-bench-", dir=base))
    print(f"pmq bench: two cage processes on {HOST}, pmq {pmq.__version__} defaults (fsync on "
          f"both cages before each acknowledgement)\nscratch directory: {work} "
          f"({fs_type(work)}), Python {platform.python_version()}, {os.cpu_count()} CPUs\n",
          flush=True)
    started = time.monotonic()
    results = []
    try:
        for row in ROWS:
            calls = args.calls if not row.rate else min(args.calls, round(row.rate * args.seconds))
            try:
                results.append(run_row(row, calls, work))
            except RowFailed as exc:
                results.append({"row": row.name, "label": row.label, "error": str(exc)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + _table(results))
    for r in results:
        if r.get("error"):
            print(f"\n{r['label']} FAILED:\n{r['error']}")
    print(f"\ncalls/s: calls / (first call made -> last call run on the consumer); latency: "
          f"handler start - call made.\n{time.monotonic() - started:.1f} s in all.")
    report = {"kind": "pmq-bench", "created": time.time(), "args": vars(args),
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "platform": platform.platform(), "fs": fs_type(work)},
              "results": results}
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
        print(f"results saved to {args.json}")
    if args.plot:
        print(plot(report, args.plot))
    return 1 if any(r.get("error") for r in results) else 0


def _replot(source: str, path: str) -> int:
    """``--from-json``: draw a saved run (of this command or of bench/compare_remote.py)."""
    try:
        with open(source, encoding="utf-8") as file:
            report = json.load(file)
    except (OSError, ValueError) as exc:
        print(f"pmq bench: cannot read {source}: {exc}", file=sys.stderr)
        return 1
    message = plot(report, path) if isinstance(report, dict) else "no plot: not a JSON object"
    print(message)
    return 0 if message.startswith("plot saved") else 1


if __name__ == "__main__":
    sys.exit(main())

