"""The child process of test_transport.py: one cage that calls its peers when told to.

Owns: what the child does, the commands it reads and the lines it writes. Must not: decide pass
or fail; the parent reads the runs files and the reports and judges.

Run as ``python cage_peer.py NAME DATA_DIR PORT RUNS_FILE [PEER=PORT ...]``: a cage called NAME
on DATA_DIR listening on 127.0.0.1:PORT, with each PEER on 127.0.0.1:PORT, exposing ``runs``.

Commands (stdin, one a line), each answered on stdout in lines written with one ``os.write``:
- at start: ``ready``;
- ``send PEER COUNT``: COUNT queued calls ``runs.record(TAG)`` to PEER_queue, in turn single
  calls and transactions of up to 5 calls; ``made TAG CALL_ID`` for each once ``execute`` (or
  the transaction's block) returned, then ``sent PEER``;
- ``rpc PEER``: ``rpc PEER N``, where N is what ``runs.count()`` answered synchronously there;
- ``drain``: ``drained`` once ``cage.drain()`` returned;
- ``stop``: ``stopped`` once the cage stopped, then the process exits with status 0.

A TAG is ``NAME.PID>PEER/N``: unique across the lives of a cage, so a restarted child never
reuses one. ``runs.record(tag)`` appends ``CALL_ID SOURCE ATTEMPT TAG`` to RUNS_FILE (O_APPEND,
one write per line, fsynced before the handler returns).
"""

from __future__ import annotations

import os
import sys
import threading
import traceback

import pmq

#: Every wait in the child gives up after this long, in case the parent died.
LIMIT_S = 120.0


def report(line: str) -> None:
    """One line to the parent, in one write (atomic on a pipe)."""
    os.write(1, (line + "\n").encode())


class Runs:
    """The exposed module: one fsynced line per execution."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.lock = threading.Lock()
        self.lines = 0

    def record(self, tag: str) -> None:
        """Leave ``CALL_ID SOURCE ATTEMPT TAG`` in the runs file."""
        info = pmq.current_call()
        assert info is not None
        with self.lock:
            os.write(self.fd, f"{info.call_id} {info.source} {info.attempt} {tag}\n".encode())
            os.fsync(self.fd)
            self.lines += 1

    def count(self) -> int:
        """How many executions this process recorded."""
        with self.lock:
            return self.lines


def send(cage: pmq.Cage, name: str, peer: str, count: int, serial: list[int]) -> None:
    """Make `count` queued calls to `peer`, singles and transactions in turn."""
    made = 0
    while made < count:
        size = 1 if (made // 5) % 2 == 0 else min(5, count - made)
        tags = [f"{name}.{os.getpid()}>{peer}/{serial[0] + i}" for i in range(size)]
        serial[0] += size
        if size == 1:
            call_id = cage.execute.on(f"{peer}_queue").runs.record(tags[0])
            report(f"made {tags[0]} {call_id}")
        else:
            with cage.transaction() as xa:
                for tag in tags:
                    xa.on(f"{peer}_queue").runs.record(tag)
            for tag, call_id in zip(tags, xa.call_ids, strict=True):
                report(f"made {tag} {call_id}")
        made += size
    report(f"sent {peer}")


def main(argv: list[str]) -> None:
    """Start the cage, then obey the commands on stdin until ``stop``."""
    name, data_dir, port, runs_file, *peer_args = argv
    peers = {}
    for arg in peer_args:
        peer, _, peer_port = arg.partition("=")
        peers[peer] = f"127.0.0.1:{peer_port}"
    cage = pmq.Cage(name, data_dir=data_dir, listen=f"127.0.0.1:{port}", peers=peers,
                    expose={"runs": Runs(runs_file)})
    cage.start()
    report("ready")
    serial = [0]
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        try:
            if words[0] == "send":
                send(cage, name, words[1], int(words[2]), serial)
            elif words[0] == "rpc":
                answer = cage.execute.on(words[1], timeout=LIMIT_S).runs.count()
                report(f"rpc {words[1]} {answer}")
            elif words[0] == "drain":
                cage.drain(timeout=LIMIT_S)
                report("drained")
            elif words[0] == "stop":
                cage.stop()
                report("stopped")
                return
            else:
                raise ValueError(f"unknown command {line!r}")
        except BaseException:
            sys.stderr.write(f"command {line!r} failed\n{traceback.format_exc()}")
            sys.stderr.flush()
            os._exit(3)
    sys.stderr.write("stdin closed without a stop command\n")
    os._exit(4)


if __name__ == "__main__":
    main(sys.argv[1:])
