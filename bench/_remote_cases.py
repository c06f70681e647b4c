"""The measurements behind bench/compare_remote.py: each system's server, producer and consumer.

Owns: how each system is started on loopback (``serve``), how its producer sends the call
``accounts.credit(12345, amount=10, memo="x" * 40)`` (``produce``), how its consumer runs it
(``consume``), what a consumer counts (``Tally``) and the durability text of every row
(``durability``). Must not: judge against targets, build the table or save anything (the parent,
compare_remote.py, does that), talk to the parent other than through ``Hooks``, or give any system
weaker durability than the others without saying so in its durability text.

The systems, and what "acknowledged" means for each:
- Redis: ``appendonly yes`` + ``appendfsync always`` (read back), so every reply leaves after the
  AOF fsync. Producer LPUSH (pipelines of 1,000 for throughput); consumer: a Lua script moves up to
  1,000 calls to a processing list (BLMOVE when the list is empty), handlers, then one pipeline of
  LREM (the reliable-queue pattern, batched).
- RabbitMQ: durable classic queue, ``delivery_mode=2``, publisher confirms (pika's
  SelectConnection: up to 1,000 unconfirmed publishes for throughput); consumer prefetch 1,000,
  ``basic_ack`` after the handler.
- NATS JetStream: file-store work-queue stream; ``sync_interval: always`` where the server
  supports it (>= 2.10, read back from /varz). Producer ``js.publish_async`` with up to 1,000
  pending acks; consumer: a pull consumer kept fed with pull requests of 1,000, handlers for what
  has arrived, ``ack_sync`` of each.
- persist-queue: ``SQLiteAckQueue`` on one file shared by both processes, ``synchronous=FULL``
  set on every connection; consumer ``get`` (polling, see ``consume_persist_queue``), handler,
  ``ack``.
- pmq: two cages ("a" produces, "b" exposes ``accounts``), defaults (fsync before every ack).
  Producer: transactions of 1,000, or ``aexecute`` from 1,000 asyncio tasks, for throughput; for
  latency the open loop of Redis and NATS, each call an ``aexecute``.

Invariants:
- Every message names its call (module, method, args, kwargs) and carries its index ``i`` (the
  consumer counts distinct indexes and duplicates apart) and ``sent``, the producer's
  ``time.time()`` taken just before the send that carries it. The consumer runs
  ``Accounts.credit``, then ``Tally.ran`` records ``time.time() - sent``; only then is the call
  acknowledged. A pmq call carries its index as the keyword argument ``i`` (there is no message
  around it), and its handler counts it: a call pmq ran twice, under whatever id, shows as a
  duplicate.
- A throughput producer sends for ``plan.seconds`` and reports how many calls were acknowledged;
  a latency producer sends ``plan.calls`` calls on the schedule ``t0 + i / rate`` (open loop:
  never waiting for earlier acknowledgements) and reports how late it was against the schedule.
- A producer keeps its connection (pmq: its cage, which still holds the calls it has not
  transmitted) until the parent says stop; a consumer returns when it has run ``target`` distinct
  calls or nothing new arrived for ``plan.stall_s`` seconds.
- Servers listen on 127.0.0.1 on a free port with a fresh data directory under the scratch
  directory, run in their own process group, and are stopped when ``serve`` exits, error or not.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

import _benchutil as bu

HOST = "127.0.0.1"
ACCOUNT = 12345
AMOUNT = 10
MEMO = "x" * 40
BATCH = 1000  # pipeline / confirm window / transaction / consumer fetch size
ASYNC_PRODUCERS = 1000  # pmq aexecute tasks
PQ_WORKERS = 8  # threads of the persist-queue open-loop producer (puts serialize on one lock)
PQ_POLL_S = 0.0005  # persist-queue consumer: sleep between polls of an empty queue
PQ_CLEAR_EVERY = 1000  # persist-queue consumer: clear_acked_data() after this many acks
SERVER_START_S = {"redis": 20.0, "rabbitmq": 60.0, "nats": 20.0}
PMQ_DURABILITY = "pmq defaults: fsync on both cages before each acknowledgement"


# ---------------------------------------------------------------------------------------------
# what the parent hands a child, and what a child hands back


@dataclass
class Plan:
    """One row, as its producer and consumer children receive it (JSON on the command line)."""

    system: str
    case: str
    mode: str  # "throughput" or "latency"
    variant: str  # pmq throughput: "xa" or "async"; else ""
    seconds: float  # throughput: how long the producer sends
    rate: float  # latency: offered calls/s
    calls: int  # latency: how many calls the producer sends (0 for throughput)
    port: int
    data_dir: str  # this row's own directory
    name: str  # queue / key / stream name of this row
    stall_s: float  # a consumer gives up after this long without a new call
    stop_s: float  # a producer waits this long at most for the parent's STOP


@dataclass
class Hooks:
    """How a child talks to the parent: its stdout/stdin protocol, wrapped as callbacks."""

    ready: Callable[[], None] = lambda: None  # consumer: the queue exists, it is consuming
    report: Callable[[dict[str, Any]], None] = lambda result: None  # producer: its result
    wait_stop: Callable[[], None] = lambda: None  # producer: until the parent says STOP


class Tally:
    """What a consumer has run: distinct calls, duplicates, latencies, and when it finished.

    Thread-safe: pmq runs handlers in a thread pool, the others in the consumer's own loop.
    """

    def __init__(self, target: int | None, stall_s: float) -> None:
        self._lock = threading.Lock()
        self._done = threading.Event()
        # A dict of plain keys and a typed array: the garbage collector does not track them
        # (a set or list of hundreds of thousands costs every full collection milliseconds,
        # and would be charged to the system measured).
        self._seen: dict[Any, None] = {}
        self.target = target
        self.stall_s = stall_s
        self.runs = 0
        self.duplicates = 0
        self.latencies = array.array("d")
        self.first_t: float | None = None  # time.time() of the first distinct call
        self.last_t: float | None = None  # ... of the latest distinct call
        self.finish_t: float | None = None  # ... of the target-th distinct call
        # when the count of distinct calls last grew (as should_stop, polling, saw it)
        self._progress = time.monotonic()
        self._progress_distinct = 0

    def ran(self, key: Any, sent: float | None) -> None:
        """A handler ran the call ``key`` (called at its end): count the run, count the call
        once (or as a duplicate), and record now - sent.

        One clock reading and one lock per call. This is the harness's work, done in every
        system's consumer for every call and charged to it: it was two methods, two locks and
        three clocks (1.6 µs a call, a fifth of pmq's receiving cage), now 0.9 µs.
        """
        now = time.time()
        with self._lock:
            self.runs += 1
            if sent is not None:
                self.latencies.append(now - sent)
            seen = self._seen
            if key in seen:
                self.duplicates += 1
                return
            seen[key] = None
            if self.first_t is None:
                self.first_t = now
            self.last_t = now
            if self.target is not None and len(seen) >= self.target:
                if self.finish_t is None:
                    self.finish_t = now
                self._done.set()

    def set_target(self, target: int) -> None:
        """The producer is done and sent ``target`` calls (throughput rows)."""
        with self._lock:
            self.target = target
            self._progress = time.monotonic()
            if len(self._seen) >= target:
                # the target-th distinct call is the latest one: every index is below target
                self.finish_t = self.last_t if target else time.time()
                self._done.set()

    def should_stop(self) -> bool:
        """True once the target is reached, or nothing new came for ``stall_s`` seconds.

        Progress is noticed here, where the consumer polls, rather than stamped on every call.
        """
        if self._done.is_set():
            return True
        now = time.monotonic()
        distinct = len(self._seen)
        if distinct != self._progress_distinct:
            self._progress_distinct = distinct
            self._progress = now
            return False
        return now - self._progress > self.stall_s

    def wait(self, timeout: float) -> None:
        self._done.wait(timeout)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            latencies = sorted(self.latencies)
            out: dict[str, Any] = {
                "distinct": len(self._seen),
                "duplicates": self.duplicates,
                "runs": self.runs,
                "target": self.target,
                "first_t": self.first_t,
                "last_t": self.last_t,
                "finish_t": self.finish_t,
                "stalled": not self._done.is_set(),
            }
        out.update(latency_ms(latencies))
        return out


def latency_ms(sorted_s: list[float], prefix: str = "") -> dict[str, float]:
    """p50, p99, max and mean of sorted latencies in seconds, in milliseconds."""
    if not sorted_s:
        return {}
    return {
        f"{prefix}p50_ms": bu.percentile(sorted_s, 0.50) * 1e3,
        f"{prefix}p99_ms": bu.percentile(sorted_s, 0.99) * 1e3,
        f"{prefix}max_ms": sorted_s[-1] * 1e3,
        f"{prefix}mean_ms": sum(sorted_s) / len(sorted_s) * 1e3,
        f"{prefix}samples": len(sorted_s),
    }


class Accounts:
    """The module every consumer exposes. pmq's ``credit`` counts its run itself, by the index
    it was called with; the other consumers' ``run_call`` counts it by the message's index."""

    def __init__(self, tally: Tally, counts: bool = False) -> None:
        self._tally = tally
        self._counts = counts  # pmq: credit counts the call

    def credit(self, account: int, amount: int, memo: str = "", sent: float | None = None,
               i: int | None = None) -> None:
        if self._counts:
            self._tally.ran(i, sent)


def call(i: int, sent: float) -> dict[str, Any]:
    """The message for call number ``i``, sent at ``sent``."""
    return {
        "i": i,
        "module": "accounts",
        "method": "credit",
        "args": [ACCOUNT],
        "kwargs": {"amount": AMOUNT, "memo": MEMO, "sent": sent},
    }


def encode(i: int, sent: float) -> bytes:
    return bytes(msgpack.packb(call(i, sent)))


def run_call(message: dict[str, Any], modules: dict[str, Any], tally: Tally) -> None:
    """Run the call a message names, then count it (by its index) in ``tally``."""
    kwargs = message["kwargs"]
    getattr(modules[message["module"]], message["method"])(*message["args"], **kwargs)
    tally.ran(message["i"], kwargs.get("sent"))


# ---------------------------------------------------------------------------------------------
# producers' bookkeeping and open-loop drivers


class SendLog:
    """What a producer sent: acknowledged calls, first/last send stamps, lateness vs schedule."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0
        self.first: float | None = None
        self.last: float | None = None
        self.lags: list[float] = []

    def sent(self, stamp: float) -> None:
        """Calls stamped ``stamp`` went out (``acked`` counts them once acknowledged)."""
        with self._lock:
            if self.first is None or stamp < self.first:
                self.first = stamp
            if self.last is None or stamp > self.last:
                self.last = stamp

    def lag(self, seconds: float) -> None:
        with self._lock:
            self.lags.append(seconds)

    def acked(self, count: int) -> None:
        with self._lock:
            self.calls += count

    def result(self, **more: Any) -> dict[str, Any]:
        out: dict[str, Any] = {
            "calls": self.calls,
            "first_send": self.first,
            "last_send": self.last,
        }
        out.update(latency_ms(sorted(self.lags), "lag_"))
        out.update(more)
        return out


def open_loop_threads(
    plan: Plan, log: SendLog, send: Callable[[int, float], None], workers: int
) -> None:
    """Send ``plan.calls`` calls at ``plan.rate``: a scheduler thread hands due calls to a pool.

    ``send(i, stamp)`` runs in a pool thread and returns once the call is acknowledged; a pool
    that cannot keep up shows as lag (``stamp - scheduled time``).
    """
    errors: list[BaseException] = []

    def job(i: int, due: float) -> None:
        stamp = time.time()
        log.sent(stamp)
        log.lag(stamp - due)
        try:
            send(i, stamp)
        except BaseException as exc:  # reported after the schedule, the others go on
            errors.append(exc)
            return
        log.acked(1)

    interval = 1.0 / plan.rate
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="open-loop") as pool:
        t0 = time.time() + 0.01
        i = 0
        while i < plan.calls and not errors:
            now = time.time()
            due = min(plan.calls, int((now - t0) / interval) + 1) if now >= t0 else 0
            while i < due:
                pool.submit(job, i, t0 + i * interval)
                i += 1
            if i < plan.calls:
                time.sleep(max(0.0, t0 + i * interval - time.time()))
    if errors:
        raise errors[0]


async def open_loop_async(
    plan: Plan, log: SendLog, send_batch: Callable[[int, int, float], Awaitable[None]]
) -> None:
    """Send ``plan.calls`` calls at ``plan.rate`` from one event loop, never awaiting acks first.

    Every wake-up sends the calls due by then as one batch (``send_batch(lo, hi, stamp)`` in its
    own task, which returns once all of them are acknowledged).
    """
    interval = 1.0 / plan.rate
    pending: set[asyncio.Task[None]] = set()
    errors: list[BaseException] = []

    async def batch(lo: int, hi: int, stamp: float) -> None:
        await send_batch(lo, hi, stamp)
        log.acked(hi - lo)

    def finished(task: asyncio.Task[None]) -> None:
        pending.discard(task)
        failure = None if task.cancelled() else task.exception()
        if failure is not None:
            errors.append(failure)

    t0 = time.time() + 0.01
    i = 0
    while i < plan.calls and not errors:
        now = time.time()
        due = min(plan.calls, int((now - t0) / interval) + 1) if now >= t0 else 0
        if due > i:
            log.sent(now)
            for j in range(i, due):
                log.lag(now - (t0 + j * interval))
            task = asyncio.create_task(batch(i, due, now))
            pending.add(task)
            task.add_done_callback(finished)
            i = due
        await asyncio.sleep(max(0.0, t0 + i * interval - time.time()))
    if pending:
        await asyncio.wait(pending)
    if errors:
        raise errors[0]


async def latency_row_async(
    plan: Plan,
    log: SendLog,
    hooks: Hooks,
    send_batch: Callable[[int, int, float], Awaitable[None]],
    method: str,
) -> None:
    """An asyncio producer's latency row, once connected: the open loop, the report, then STOP.

    The wait for STOP belongs here: the connection may still carry calls the consumer has not
    run, so the caller closes it only after this returns.
    """
    await open_loop_async(plan, log, send_batch)
    hooks.report(log.result(method=method))
    await asyncio.to_thread(hooks.wait_stop)


# ---------------------------------------------------------------------------------------------
# servers


class ServerUnavailable(Exception):
    """The server could not be started or did not become ready: the reason is the message."""


@dataclass
class Server:
    """A running server (or, for persist-queue and pmq, nothing to run)."""

    system: str
    port: int = 0
    version: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    log_path: str | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def tail(path: str | os.PathLike[str] | None, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file ('' if there is none)."""
    if path is None:
        return ""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _stop_group(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL, to the process group this module started ``proc`` in."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def _spawn(command: list[str], log: Path, env: dict[str, str] | None = None) -> Any:
    """Start a server in its own process group (so it can be stopped whole), output to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _wait_ready(
    what: str,
    probe: Callable[[], Any],
    proc: subprocess.Popen[bytes],
    timeout: float,
    logs: list[Path],
) -> Any:
    """Call ``probe`` until it returns without raising; the server dying or time running out
    raises ServerUnavailable with the last lines of its logs (files, or the *.log files of
    directories, as they are by then)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            return probe()
        except Exception as exc:
            last = exc
            time.sleep(0.25)
    state = (
        f"exited with status {proc.returncode} before it was ready"
        if proc.poll() is not None
        else f"was not ready within {timeout:g} s"
    )
    files = [f for p in logs for f in (sorted(p.glob("*.log")) if p.is_dir() else [p])]
    logs_text = "\n".join(f"--- {f.name} ---\n{tail(f)}" for f in files if tail(f))
    raise ServerUnavailable(
        f"{what} {state}\nlast error of the readiness check: {last!r}\n"
        f"last log lines:\n{logs_text or '(no log)'}"
    )


@contextlib.contextmanager
def serve(system: str, work: Path, tool: dict[str, Any]) -> Iterator[Server]:
    """Start ``system``'s server under ``work`` and stop it when the block exits."""
    starters = {"redis": _serve_redis, "rabbitmq": _serve_rabbitmq, "nats": _serve_nats}
    if system not in starters:  # persist-queue and pmq run no server
        yield Server(system=system, version=str(tool.get("version", "")))
        return
    with starters[system](work, tool) as server:
        yield server


@contextlib.contextmanager
def _serve_redis(work: Path, tool: dict[str, Any]) -> Iterator[Server]:
    import redis

    data = work / "redis-data"
    data.mkdir(parents=True)
    port = free_port()
    log = work / "redis.log"
    command = [
        tool["bin"],
        "--port", str(port),
        "--bind", HOST,
        "--dir", str(data),
        "--appendonly", "yes",
        "--appendfsync", "always",
        "--save", "",
        "--daemonize", "no",
        "--protected-mode", "yes",
        "--logfile", str(log),
    ]  # fmt: skip
    proc = _spawn(command, work / "redis.stdout")
    try:

        def probe() -> dict[str, Any]:
            client = redis.Redis(host=HOST, port=port, socket_timeout=5)
            try:
                client.ping()
                config = {**client.config_get("appendonly"), **client.config_get("appendfsync")}
                info = client.info("server")
            finally:
                client.close()
            return {"config": config, "version": info.get("redis_version", "?")}

        found = _wait_ready(
            "redis-server", probe, proc, SERVER_START_S["redis"], [log, work / "redis.stdout"]
        )
        config = found["config"]
        if config.get("appendonly") != "yes" or config.get("appendfsync") != "always":
            raise ServerUnavailable(f"redis-server refused appendonly/appendfsync: {config}")
        yield Server(
            system="redis",
            port=port,
            version=str(found["version"]),
            settings={**config, "data_dir": str(data)},
            log_path=str(log),
        )
    finally:
        _stop_group(proc)


def _rabbit_env(base: Path, port: int, dist_port: int, epmd_port: int, node: str) -> dict[str, str]:
    """The environment of our own RabbitMQ node: every file, port and name under ``base``."""
    home = base / "home"
    home.mkdir(parents=True, exist_ok=True)
    (base / "enabled_plugins").write_text("[].\n", encoding="utf-8")
    (base / "rabbitmq.conf").write_text("# empty: defaults\n", encoding="utf-8")
    (base / "rabbitmq-env.conf").write_text("# empty: the environment says it all\n")
    return {
        **os.environ,
        "HOME": str(home),  # the Erlang cookie lives here, not in root's home
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_NODE_IP_ADDRESS": HOST,
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_DIST_PORT": str(dist_port),
        "ERL_EPMD_PORT": str(epmd_port),  # our own epmd, stopped with the node
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
        "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
        "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
    }


@contextlib.contextmanager
def _serve_rabbitmq(work: Path, tool: dict[str, Any]) -> Iterator[Server]:
    import pika  # type: ignore[import-untyped]

    base = work / "rabbitmq"
    base.mkdir(parents=True)
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    port, dist_port, epmd_port = sorted(ports)
    node = f"pmqbench{os.getpid()}@localhost"
    env = _rabbit_env(base, port, dist_port, epmd_port, node)
    stdout = base / "server.stdout"
    proc = _spawn([tool["bin"]], stdout, env=env)
    try:

        def probe() -> dict[str, Any]:
            params = pika.ConnectionParameters(
                host=HOST, port=port, connection_attempts=1, socket_timeout=2
            )
            connection = pika.BlockingConnection(params)
            try:
                props = dict(connection._impl.server_properties)
            finally:
                connection.close()
            version = props.get("version", b"?")
            return {"version": version.decode() if isinstance(version, bytes) else str(version)}

        logs = [stdout, base / "log"]
        found = _wait_ready("rabbitmq-server", probe, proc, SERVER_START_S["rabbitmq"], logs)
        yield Server(
            system="rabbitmq",
            port=port,
            version=found["version"],
            settings={"node": node, "mnesia": str(base / "mnesia"), "queue_type": "classic"},
            log_path=str(stdout),
        )
    finally:
        if tool.get("ctl") and proc.poll() is None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    [tool["ctl"], "-n", node, "stop"],
                    env=env,
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
        _stop_group(proc)
        if tool.get("epmd"):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    [tool["epmd"], "-port", str(epmd_port), "-kill"],
                    env=env,
                    capture_output=True,
                    timeout=10,
                    check=False,
                )


@contextlib.contextmanager
def _serve_nats(work: Path, tool: dict[str, Any]) -> Iterator[Server]:
    base = work / "nats"
    base.mkdir(parents=True)
    port, http_port = free_port(), free_port()
    while http_port == port:
        http_port = free_port()
    sync = bool(tool.get("sync_always_supported"))
    sync_line = "  sync_interval: always\n" if sync else ""
    config = base / "nats.conf"
    config.write_text(
        f"listen: {HOST}:{port}\n"
        f"http: {HOST}:{http_port}\n"
        f"jetstream {{\n  store_dir: {json.dumps(str(base / 'store'))}\n{sync_line}}}\n",
        encoding="utf-8",
    )
    log = base / "nats.log"
    proc = _spawn([tool["bin"], "-c", str(config)], log)
    try:

        def probe() -> dict[str, Any]:
            url = f"http://{HOST}:{http_port}/varz"
            with urllib.request.urlopen(url, timeout=2) as answer:
                varz: dict[str, Any] = json.load(answer)
            if not port_open(port):
                raise ConnectionError(f"port {port} not open yet")
            return varz

        varz = _wait_ready("nats-server", probe, proc, SERVER_START_S["nats"], [log])
        js_config = (varz.get("jetstream") or {}).get("config") or {}
        sync_always = js_config.get("sync_always")
        if sync and sync_always is not True:
            raise ServerUnavailable(f"nats-server ignored sync_interval: always ({js_config})")
        yield Server(
            system="nats",
            port=port,
            version=str(varz.get("version", tool.get("version", "?"))),
            settings={
                "sync_interval_always_configured": sync,
                "varz_jetstream_config": js_config,
                "config": config.read_text(encoding="utf-8"),
            },
            log_path=str(log),
        )
    finally:
        _stop_group(proc)


# ---------------------------------------------------------------------------------------------
# durability, as each row runs it


PRODUCER_SEP = "; producer: "  # durability(): "<store and consumer>; producer: <how it sends>"


def durability(plan: Plan, server: Server) -> str:
    """What acknowledges a call in this row, in words: the store and consumer side, which all the
    rows of a system share, then ``PRODUCER_SEP`` and how this row's producer sends."""
    tput = plan.mode == "throughput"
    if plan.system == "redis":
        common = (
            f"appendonly {server.settings.get('appendonly')}, appendfsync "
            f"{server.settings.get('appendfsync')} (read back): every reply leaves after the AOF "
            f"fsync; consumer: a Lua script LMOVEs up to {BATCH:,} calls to a processing list "
            "(BLMOVE when empty), handlers, then one pipeline of LREM"
        )
        send = (
            f"pipelines of {BATCH:,} LPUSH, one at a time"
            if tput
            else "the calls due at each tick pipelined, pipelines overlapping (open loop)"
        )
    elif plan.system == "rabbitmq":
        common = (
            "durable classic queue, delivery_mode=2, publisher confirms (a persistent message is "
            "confirmed once it is fsynced, or once consumed and acked if that comes first: "
            f"RabbitMQ may hand it to the consumer before it is on disk); consumer: prefetch "
            f"{BATCH:,}, basic_ack after the handler (AMQP 0-9-1 does not confirm acks: the "
            "broker records them without telling the consumer when)"
        )
        send = (
            f"up to {BATCH:,} unconfirmed publishes (async confirms)"
            if tput
            else "publishes on the schedule (open loop), confirms async"
        )
    elif plan.system == "nats":
        if server.settings.get("sync_interval_always_configured"):
            sync_always = server.settings.get("varz_jetstream_config", {}).get("sync_always")
            store = (
                f"file-store work-queue stream, sync_interval: always (read back: sync_always="
                f"{sync_always}): every write fsynced before its ack"
            )
        else:
            store = (
                f"NOT THE SAME DURABILITY: nats-server {server.version} has no sync_interval: "
                "always, so the server's default fsync interval applies (acknowledged "
                "messages can be lost in a power failure); file-store work-queue stream"
            )
        common = (
            f"{store}; consumer: pull consumer kept fed with pull requests of {BATCH:,}; it runs "
            "every call that has arrived, then ack_sync of each (the server answers each ack)"
        )
        send = (
            f"js.publish_async with up to {BATCH:,} pending acks"
            if tput
            else "js.publish_async of the calls due at each tick (open loop)"
        )
    elif plan.system == "persist_queue":
        common = (
            "SQLiteAckQueue(multithreading=True, auto_commit=True, msgpack) on one file shared by "
            "both processes; PRAGMA synchronous=FULL on every connection (read back as 2): each "
            "put, get and ack is a COMMIT that fsyncs the WAL; consumer: get (polled every "
            f"{PQ_POLL_S * 1e3:g} ms when empty: get(block=True) waits on an in-process event, "
            "blind to the other process), handler, ack"
        )
        send = "put in a loop, 1 thread" if tput else f"put from {PQ_WORKERS} threads (open loop)"
    else:
        common = PMQ_DURABILITY
        if plan.variant == "xa":
            send = f"transactions of {BATCH:,} calls"
        elif plan.variant == "async":
            send = f"aexecute from {ASYNC_PRODUCERS:,} asyncio tasks"
        else:
            send = "aexecute of the calls due at each tick, awaited together (open loop)"
    return common + PRODUCER_SEP + send


# ---------------------------------------------------------------------------------------------
# Redis

# Moves up to ARGV[1] calls from the source list to the processing list in one round trip.
REDIS_FETCH = """
local moved = {}
for _ = 1, tonumber(ARGV[1]) do
  local item = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not item then break end
  moved[#moved + 1] = item
end
return moved
"""


def produce_redis(plan: Plan, hooks: Hooks) -> None:
    import redis

    key = plan.name
    log = SendLog()
    if plan.mode == "throughput":
        client = redis.Redis(host=HOST, port=plan.port)
        client.ping()
        try:
            i = 0
            deadline = time.time() + plan.seconds
            while time.time() < deadline:
                stamp = time.time()
                pipe = client.pipeline(transaction=False)
                for j in range(i, i + BATCH):
                    pipe.lpush(key, encode(j, stamp))
                log.sent(stamp)
                pipe.execute()  # raises on any failed command
                log.acked(BATCH)
                i += BATCH
            hooks.report(log.result(method=f"pipelines of {BATCH} LPUSH"))
            hooks.wait_stop()
        finally:
            client.close()
        return

    import redis.asyncio as aredis

    async def main() -> None:
        client = aredis.Redis(host=HOST, port=plan.port)
        await client.ping()

        async def send(lo: int, hi: int, stamp: float) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for j in range(lo, hi):
                    pipe.lpush(key, encode(j, stamp))
                await pipe.execute()

        try:
            await latency_row_async(plan, log, hooks, send, "open loop, due calls pipelined")
        finally:
            await client.aclose()

    asyncio.run(main())


def consume_redis(plan: Plan, tally: Tally, hooks: Hooks) -> dict[str, Any]:
    import redis

    source, processing = plan.name, plan.name + ":processing"
    client = redis.Redis(host=HOST, port=plan.port)
    fetch = client.register_script(REDIS_FETCH)
    modules = {"accounts": Accounts(tally)}
    lrem_misses = 0
    batches = 0
    try:
        client.ping()
        hooks.ready()
        while not tally.should_stop():
            items = list(fetch(keys=[source, processing], args=[BATCH]))
            if not items:
                one = client.blmove(source, processing, 1, "RIGHT", "LEFT")
                if one is None:
                    continue
                items = [one]
            for body in items:
                run_call(msgpack.unpackb(body), modules, tally)
            pipe = client.pipeline(transaction=False)
            for body in items:
                pipe.lrem(processing, 1, body)
            lrem_misses += sum(1 for removed in pipe.execute() if removed != 1)
            batches += 1
        left_source = int(client.llen(source))
        left_processing = int(client.llen(processing))
    finally:
        client.close()
    problems = []
    if left_source or left_processing or lrem_misses:
        problems.append(
            f"left {left_source} in the list and {left_processing} in processing, "
            f"{lrem_misses} LREM found nothing"
        )
    return {
        "left_in_source": left_source,
        "left_in_processing": left_processing,
        "lrem_misses": lrem_misses,
        "batches": batches,
        "problems": problems,
    }


# ---------------------------------------------------------------------------------------------
# RabbitMQ


class _RabbitProducer:
    """pika's SelectConnection with publisher confirms, publishing without waiting for them."""

    def __init__(self, plan: Plan) -> None:
        import pika

        self.plan = plan
        self.log = SendLog()
        self.props = pika.BasicProperties(delivery_mode=2)
        self.unconfirmed: collections.deque[int] = collections.deque()
        self.tag = 0  # delivery tag of the latest publish
        self.next_i = 0
        self.nacked = 0
        self.sending_done = False
        self.error: str | None = None
        self.t0 = 0.0
        self.deadline = 0.0
        self.conn: Any = None
        self.channel: Any = None

    def run(self) -> dict[str, Any]:
        import pika

        params = pika.ConnectionParameters(host=HOST, port=self.plan.port)
        self.conn = pika.SelectConnection(
            params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
        )
        self.conn.ioloop.start()
        if self.error:
            raise RuntimeError(self.error)
        if self.nacked:
            raise RuntimeError(f"RabbitMQ nacked {self.nacked} publishes")
        return self.log.result(published=self.tag, nacked=self.nacked)

    def _on_open(self, conn: Any) -> None:
        conn.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, conn: Any, error: Any) -> None:
        self.error = f"connection failed: {error!r}"
        conn.ioloop.stop()

    def _on_closed(self, conn: Any, reason: Any) -> None:
        if not (self.sending_done and not self.unconfirmed):
            self.error = self.error or f"connection closed early: {reason!r}"
        conn.ioloop.stop()

    def _on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirming)

    def _on_confirming(self, _frame: Any) -> None:
        self.t0 = time.time() + 0.01
        if self.plan.mode == "throughput":
            self.deadline = time.time() + self.plan.seconds
            self._fill()
        else:
            self.conn.ioloop.call_later(0.01, self._tick)

    def _publish(self, i: int, stamp: float) -> None:
        self.channel.basic_publish("", self.plan.name, encode(i, stamp), self.props)
        self.tag += 1
        self.unconfirmed.append(self.tag)

    def _fill(self) -> None:
        """Throughput: top the window of unconfirmed publishes up to BATCH."""
        if time.time() >= self.deadline:
            self.sending_done = True
            self._maybe_close()
            return
        for _ in range(BATCH - len(self.unconfirmed)):
            stamp = time.time()
            self._publish(self.next_i, stamp)
            self.log.sent(stamp)
            self.next_i += 1

    def _tick(self) -> None:
        """Latency: publish the calls due by now, then wake up for the next one."""
        interval = 1.0 / self.plan.rate
        now = time.time()
        due = min(self.plan.calls, int((now - self.t0) / interval) + 1) if now >= self.t0 else 0
        if due > self.next_i:
            self.log.sent(now)
            for i in range(self.next_i, due):
                self.log.lag(now - (self.t0 + i * interval))
                self._publish(i, now)
            self.next_i = due
        if self.next_i >= self.plan.calls:
            self.sending_done = True
            self._maybe_close()
            return
        delay = max(0.0, self.t0 + self.next_i * interval - time.time())
        self.conn.ioloop.call_later(delay, self._tick)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = method.delivery_tag
        count = 0
        if method.multiple:
            while self.unconfirmed and self.unconfirmed[0] <= tag:
                self.unconfirmed.popleft()
                count += 1
        else:
            with contextlib.suppress(ValueError):
                self.unconfirmed.remove(tag)
                count = 1
        if method.NAME == "Basic.Nack":
            self.nacked += count
        else:
            self.log.acked(count)
        if (
            self.plan.mode == "throughput"
            and not self.sending_done
            and len(self.unconfirmed) <= BATCH // 2
        ):
            self._fill()
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.sending_done and not self.unconfirmed and self.conn.is_open:
            self.conn.close()


def produce_rabbitmq(plan: Plan, hooks: Hooks) -> None:
    result = _RabbitProducer(plan).run()
    result["method"] = "SelectConnection, async confirms"
    hooks.report(result)
    hooks.wait_stop()


def consume_rabbitmq(plan: Plan, tally: Tally, hooks: Hooks) -> dict[str, Any]:
    import pika

    modules = {"accounts": Accounts(tally)}
    redelivered = 0
    connection = pika.BlockingConnection(pika.ConnectionParameters(host=HOST, port=plan.port))
    try:
        channel = connection.channel()
        channel.queue_declare(queue=plan.name, durable=True, arguments={"x-queue-type": "classic"})
        channel.basic_qos(prefetch_count=BATCH)

        def on_message(ch: Any, method: Any, _props: Any, body: bytes) -> None:
            nonlocal redelivered
            run_call(msgpack.unpackb(body), modules, tally)
            ch.basic_ack(delivery_tag=method.delivery_tag)
            redelivered += bool(method.redelivered)

        channel.basic_consume(queue=plan.name, on_message_callback=on_message, auto_ack=False)
        hooks.ready()
        while not tally.should_stop():
            connection.process_data_events(time_limit=0.05)
        channel.close()  # after the acks it sent: anything unacked would go back to the queue
        left = connection.channel().queue_declare(queue=plan.name, passive=True)
        left_ready = int(left.method.message_count)
    finally:
        if connection.is_open:
            connection.close()
    problems = [f"{left_ready} calls left in the queue"] if left_ready else []
    return {"left_in_queue": left_ready, "redelivered": redelivered, "problems": problems}


# ---------------------------------------------------------------------------------------------
# NATS JetStream


def _nats_names(plan: Plan) -> tuple[str, str]:
    """(stream, subject) of a row."""
    return plan.name.upper().replace(".", "_"), plan.name


def produce_nats(plan: Plan, hooks: Hooks) -> None:
    import nats

    _, subject = _nats_names(plan)
    log = SendLog()

    async def main() -> None:
        nc = await nats.connect(f"nats://{HOST}:{plan.port}", max_reconnect_attempts=0)
        js = nc.jetstream(publish_async_max_pending=BATCH)
        try:
            if plan.mode == "throughput":
                futures: list[asyncio.Future[Any]] = []
                i = 0
                deadline = time.time() + plan.seconds
                while time.time() < deadline:
                    for _ in range(BATCH):
                        stamp = time.time()
                        futures.append(await js.publish_async(subject, encode(i, stamp)))
                        log.sent(stamp)
                        i += 1
                acks = await asyncio.gather(*futures)
                log.acked(len(acks))
                duplicates = sum(1 for ack in acks if getattr(ack, "duplicate", False))
                hooks.report(log.result(method="publish_async", pub_ack_duplicates=duplicates))
                await asyncio.to_thread(hooks.wait_stop)
            else:

                async def send(lo: int, hi: int, stamp: float) -> None:
                    pending = [
                        await js.publish_async(subject, encode(j, stamp)) for j in range(lo, hi)
                    ]
                    await asyncio.gather(*pending)

                await latency_row_async(plan, log, hooks, send, "open loop, publish_async")
        finally:
            await nc.close()

    asyncio.run(main())


def consume_nats(plan: Plan, tally: Tally, hooks: Hooks) -> dict[str, Any]:
    """A pull consumer kept fed: pull requests for BATCH calls on the consumer's own inbox, a new
    one whenever less than BATCH is still asked for (nats.go's ``Consume`` does the same).

    Every call that has arrived is run, then all of them are ``ack_sync``-ed at once. nats-py's
    ``fetch(batch)`` is not used: once a first message arrived it waits for the whole batch or
    its timeout, which would add up to that timeout to every latency at a low rate.
    """
    import nats
    from nats.js.api import (
        AckPolicy,
        ConsumerConfig,
        RetentionPolicy,
        StorageType,
        StreamConfig,
    )

    stream, subject = _nats_names(plan)
    modules = {"accounts": Accounts(tally)}
    out: dict[str, Any] = {"problems": []}

    async def main() -> None:
        nc = await nats.connect(f"nats://{HOST}:{plan.port}", max_reconnect_attempts=0)
        try:
            js = nc.jetstream()
            await js.add_stream(
                StreamConfig(
                    name=stream,
                    subjects=[subject],
                    storage=StorageType.FILE,
                    retention=RetentionPolicy.WORK_QUEUE,
                )
            )
            await js.add_consumer(
                stream,
                ConsumerConfig(
                    durable_name="worker",
                    ack_policy=AckPolicy.EXPLICIT,
                    max_ack_pending=BATCH * 10,
                    ack_wait=60.0,
                ),
            )
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox, pending_msgs_limit=BATCH * 20)
            next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.worker"
            asked: collections.deque[int] = collections.deque()  # calls still owed, per request
            request = json.dumps({"batch": BATCH, "expires": 1_000_000_000}).encode()
            statuses: collections.Counter[str] = collections.Counter()
            redelivered = 0

            async def keep_asking() -> None:
                while sum(asked) < BATCH:
                    await nc.publish(next_subject, request, reply=inbox)
                    asked.append(BATCH)

            def arrived(msg: Any) -> bool:
                """Account for one delivery; True if it is a call (not a status)."""
                status = msg.headers.get("Status") if msg.headers else None
                if status is None:
                    if asked:
                        asked[0] -= 1
                        if asked[0] <= 0:
                            asked.popleft()
                    return True
                statuses[status] += 1
                if status != "100" and asked:  # 408 expired, 409 ...: that request is over
                    asked.popleft()
                return False

            await keep_asking()
            hooks.ready()
            while not tally.should_stop():
                try:
                    first = await sub.next_msg(timeout=0.2)
                except TimeoutError:
                    await keep_asking()
                    continue
                msgs = [first] if arrived(first) else []
                while sub.pending_msgs and len(msgs) < BATCH:
                    msg = await sub.next_msg(timeout=None)
                    if arrived(msg):
                        msgs.append(msg)
                await keep_asking()
                for msg in msgs:
                    run_call(msgpack.unpackb(msg.data), modules, tally)
                    redelivered += msg.metadata.num_delivered > 1
                await asyncio.gather(*(msg.ack_sync(timeout=10.0) for msg in msgs))
            await sub.unsubscribe()
            info = await js.stream_info(stream)
            out["left_in_stream"] = int(info.state.messages)
            out["redelivered"] = redelivered
            out["pull_statuses"] = dict(statuses)
            if info.state.messages:
                out["problems"].append(f"{info.state.messages} calls left in the stream")
        finally:
            await nc.close()

    asyncio.run(main())
    return out


# ---------------------------------------------------------------------------------------------
# persist-queue


def _pq_open(plan: Plan) -> tuple[Any, dict[str, Any]]:
    """The row's SQLiteAckQueue, with synchronous=FULL on every connection (read back)."""
    import sqlite3

    from persistqueue import SQLiteAckQueue
    from persistqueue.serializers import msgpack as pq_msgpack

    queue = SQLiteAckQueue(
        str(Path(plan.data_dir) / "pq"),
        multithreading=True,
        auto_commit=True,
        serializer=pq_msgpack,
    )
    settings: dict[str, Any] = {"sqlite": sqlite3.sqlite_version}
    for role in ("_putter", "_getter"):
        conn = getattr(queue, role)
        conn.execute("PRAGMA synchronous=FULL")
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        sync = conn.execute("PRAGMA synchronous").fetchone()[0]
        if mode != "wal" or sync != 2:
            raise RuntimeError(f"persist-queue's {role} is not WAL/FULL: {mode}, {sync}")
        settings[role.strip("_")] = {"journal_mode": mode, "synchronous": sync}
    return queue, settings


def produce_persist_queue(plan: Plan, hooks: Hooks) -> None:
    queue, settings = _pq_open(plan)
    log = SendLog()
    try:
        if plan.mode == "throughput":
            put = queue.put
            i = 0
            deadline = time.time() + plan.seconds
            while time.time() < deadline:
                stamp = time.time()
                log.sent(stamp)
                put(call(i, stamp))
                log.acked(1)
                i += 1
        else:
            open_loop_threads(plan, log, lambda i, stamp: queue.put(call(i, stamp)), PQ_WORKERS)
        hooks.report(log.result(method="put", settings=settings))
        hooks.wait_stop()
    finally:
        queue.close()


def consume_persist_queue(plan: Plan, tally: Tally, hooks: Hooks) -> dict[str, Any]:
    from persistqueue import Empty

    queue, settings = _pq_open(plan)
    modules = {"accounts": Accounts(tally)}
    acked = 0
    polls = 0
    try:
        hooks.ready()
        while not tally.should_stop():
            try:
                item = queue.get(block=False, raw=True)
            except Empty:
                polls += 1
                time.sleep(PQ_POLL_S)
                continue
            run_call(item["data"], modules, tally)
            queue.ack(id=item["pqid"])
            acked += 1
            if acked % PQ_CLEAR_EVERY == 0:
                queue.clear_acked_data(max_delete=PQ_CLEAR_EVERY * 2, keep_latest=0)
        ready, unacked = int(queue.ready_count()), int(queue.unack_count())
    finally:
        queue.close()
    problems = [f"{ready} ready and {unacked} unacked rows left"] if ready or unacked else []
    return {
        "left_ready": ready,
        "left_unacked": unacked,
        "acked": acked,
        "empty_polls": polls,
        "settings": settings,
        "problems": problems,
    }


# ---------------------------------------------------------------------------------------------
# pmq: two cages, public API only (DESIGN.md section 1)


def produce_pmq(plan: Plan, hooks: Hooks) -> None:
    import pmq

    data_dir = str(Path(plan.data_dir) / "a")
    peers = {"b": f"{HOST}:{plan.port}"}
    log = SendLog()
    if plan.mode == "latency":
        # The open loop of the other asyncio producers (Redis, NATS): the calls due at each
        # tick go out together, each an aexecute, and the tick's task returns once all are
        # durable here. (`pmq bench` measures execute from a pool of threads instead, whose
        # wake-ups and GIL hand-offs a thread pool adds to every call: docs/performance.md.)

        async def latency() -> None:
            async with pmq.Cage("a", data_dir=data_dir, peers=peers) as cage:
                aexecute = cage.aexecute

                async def send_batch(lo: int, hi: int, stamp: float) -> None:
                    await asyncio.gather(*[
                        aexecute.on("b_queue").accounts.credit(
                            ACCOUNT, amount=AMOUNT, memo=MEMO, sent=stamp, i=i)
                        for i in range(lo, hi)])

                await latency_row_async(plan, log, hooks, send_batch,
                                        "open loop, aexecute of the calls due at each tick")

        asyncio.run(latency())
        return
    if plan.variant == "async":

        async def main() -> None:
            async with pmq.Cage("a", data_dir=data_dir, peers=peers) as cage:
                deadline = time.time() + plan.seconds
                indexes = itertools.count()

                async def producer() -> None:
                    # One clock reading per call, and the log told once per task (its first and
                    # last stamps, its count): the bookkeeping of a thousand tasks is not pmq's.
                    aexecute = cage.aexecute
                    acked = 0
                    stamp = first = time.time()
                    while stamp < deadline:
                        await aexecute.on("b_queue").accounts.credit(
                            ACCOUNT, amount=AMOUNT, memo=MEMO, sent=stamp, i=next(indexes)
                        )
                        acked += 1
                        last, stamp = stamp, time.time()
                    if acked:
                        log.sent(first)
                        log.sent(last)
                        log.acked(acked)

                async with asyncio.TaskGroup() as group:
                    for _ in range(ASYNC_PRODUCERS):
                        group.create_task(producer())
                hooks.report(log.result(method=f"aexecute, {ASYNC_PRODUCERS} tasks"))
                await asyncio.to_thread(hooks.wait_stop)

        asyncio.run(main())
        return

    if plan.variant != "xa":
        raise ValueError(f"pmq throughput has the variants xa and async, not {plan.variant!r}")
    cage = pmq.Cage("a", data_dir=data_dir, peers=peers)
    cage.start()
    try:
        deadline = time.time() + plan.seconds
        made = 0
        while time.time() < deadline:
            stamp = time.time()
            log.sent(stamp)
            with cage.transaction() as xa:
                for i in range(made, made + BATCH):
                    xa.on("b_queue").accounts.credit(
                        ACCOUNT, amount=AMOUNT, memo=MEMO, sent=stamp, i=i
                    )
            made += BATCH
            log.acked(BATCH)
        hooks.report(log.result(method=f"transactions of {BATCH}"))
        hooks.wait_stop()
    finally:
        cage.stop()


def consume_pmq(plan: Plan, tally: Tally, hooks: Hooks) -> dict[str, Any]:
    import pmq

    accounts = Accounts(tally, counts=True)
    cage = pmq.Cage(
        "b",
        data_dir=str(Path(plan.data_dir) / "b"),
        listen=f"{HOST}:{plan.port}",
        expose={"accounts": accounts},
    )
    cage.start()
    try:
        hooks.ready()
        while not tally.should_stop():
            tally.wait(0.05)
    finally:
        cage.stop()
    return {"problems": []}


# ---------------------------------------------------------------------------------------------
# dispatch by system

PRODUCERS: dict[str, Callable[[Plan, Hooks], None]] = {
    "redis": produce_redis,
    "rabbitmq": produce_rabbitmq,
    "nats": produce_nats,
    "persist_queue": produce_persist_queue,
    "pmq": produce_pmq,
}
CONSUMERS: dict[str, Callable[[Plan, Tally, Hooks], dict[str, Any]]] = {
    "redis": consume_redis,
    "rabbitmq": consume_rabbitmq,
    "nats": consume_nats,
    "persist_queue": consume_persist_queue,
    "pmq": consume_pmq,
}


def produce(plan: Plan, hooks: Hooks) -> None:
    """The producer child's work: send, ``hooks.report`` the result, wait for STOP, close."""
    PRODUCERS[plan.system](plan, hooks)


def consume(plan: Plan, tally: Tally, hooks: Hooks) -> dict[str, Any]:
    """The consumer child's work: create the queue, ``hooks.ready()``, run calls until the
    target or a stall, and return the system's own end checks (``problems`` lists failures)."""
    return CONSUMERS[plan.system](plan, tally, hooks)
