"""Where the CPU of an end-to-end run goes: per call, on the sending and on the receiving cage.

Owns: the "CPU per call" figures of docs/performance.md. Run:
``.venv/bin/python bench/cpu_split.py`` (``--calls N``, ``--runs K``; ``--tally`` gives the
receiver compare_remote's handler, which counts each call by its index; ``--backlog`` makes every
call before the receiver starts, so the sender's CPU is its sending alone).

Two cage processes on loopback at pmq's defaults (fsync on both before each acknowledgement):
``a`` makes the calls in transactions of 1,000 and ``b`` runs them. The throughput is calls /
(first call made -> last call run); the CPU is each process's user + system time (os.times()),
from its start, divided by the calls. On a 2-vCPU machine the two cages share both CPUs, so
the receiver's CPU per call bounds what it can run: 8 us per call is 125,000 calls/s at most.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import pmq

BATCH = 1000
HERE = os.path.dirname(os.path.abspath(__file__))


def _receiver(calls: int, port: int, directory: str, tally: bool) -> None:
    done = threading.Event()
    count = [0]

    class Accounts:
        def credit(self, account: int, amount: int, memo: str = "", sent: float = 0.0,
                   i: int = 0) -> None:
            count[0] += 1
            if count[0] == calls:
                done.set()

    accounts: Any = Accounts()
    if tally:
        sys.path.insert(0, HERE)
        import _remote_cases as rc

        counted = rc.Tally(target=calls, stall_s=30.0)
        accounts = rc.Accounts(counted, counts=True)

        def watch() -> None:
            while not counted.should_stop():
                counted.wait(0.05)
            done.set()

        threading.Thread(target=watch, daemon=True).start()
    with pmq.Cage("b", data_dir=directory, listen=f"127.0.0.1:{port}") as cage:
        cage.expose("accounts", accounts)
        print("ready", flush=True)
        done.wait()
        times = os.times()
        print(json.dumps({"end": time.time(), "cpu": times.user + times.system}), flush=True)


def _sender(calls: int, port: int, directory: str) -> None:
    with pmq.Cage("a", data_dir=directory, peers={"b": f"127.0.0.1:{port}"}) as cage:
        start = time.time()
        for made in range(0, calls // BATCH * BATCH, BATCH):
            with cage.transaction() as xa:
                accounts = xa.on("b_queue").accounts
                for i in range(made, made + BATCH):  # i: the index compare_remote's calls carry
                    accounts.credit(12345, amount=10, memo="x" * 40, sent=start, i=i)
        times = os.times()
        print(json.dumps({"start": start, "cpu": times.user + times.system}), flush=True)
        while cage.store is not None and cage.store.outstanding():
            time.sleep(0.01)
        times = os.times()
        print(json.dumps({"cpu": times.user + times.system}), flush=True)


def _child(role: str, calls: int, port: int, directory: str, tally: bool) -> subprocess.Popen[str]:
    args = [sys.executable, __file__, "--role", role, "--calls", str(calls), "--port", str(port),
            "--dir", directory, *(["--tally"] if tally else [])]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


def _ready(child: subprocess.Popen[str]) -> None:
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    if line != "ready":
        raise SystemExit(f"the receiving cage did not start: {line!r}")


def _read(child: subprocess.Popen[str]) -> dict[str, float]:
    assert child.stdout is not None
    return json.loads(child.stdout.readline())  # type: ignore[no-any-return]


def run_once(calls: int, tally: bool, backlog: bool) -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    work = os.path.join(HERE, ".work")
    os.makedirs(work, exist_ok=True)
    directory = tempfile.mkdtemp(dir=work)
    try:
        receiver = None
        if not backlog:
            receiver = _child("b", calls, port, os.path.join(directory, "b"), tally)
            _ready(receiver)
        sender = _child("a", calls, port, os.path.join(directory, "a"), tally)
        made = _read(sender)
        if receiver is None:
            receiver = _child("b", calls, port, os.path.join(directory, "b"), tally)
            _ready(receiver)
            made["start"] = time.time()
        ran, sent = _read(receiver), _read(sender)
        sender.wait()
        receiver.wait()
        seconds = ran["end"] - made["start"]
        return (f"{calls:,} calls: {calls / seconds:,.0f} calls/s end to end; CPU per call: "
                f"sender {1e6 * sent['cpu'] / calls:.2f} us (making {1e6 * made['cpu'] / calls:.2f}"
                f"), receiver {1e6 * ran['cpu'] / calls:.2f} us")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--calls", type=int, default=400_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tally", action="store_true", help="compare_remote's counting handler")
    parser.add_argument("--backlog", action="store_true", help="make every call, then receive")
    parser.add_argument("--role", choices=("a", "b"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "a":
        _sender(args.calls, args.port, args.dir)
    elif args.role == "b":
        _receiver(args.calls, args.port, args.dir, args.tally)
    else:
        for _ in range(args.runs):
            print(run_once(args.calls - args.calls % BATCH, args.tally, args.backlog), flush=True)


if __name__ == "__main__":
    main()
