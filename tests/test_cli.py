"""The ``pmq`` command, run as a subprocess (``python -m pmq``) on real data directories.

Checks DESIGN.md §6 as pmq/cli.py implements it (docs/cli.md): ``status``, ``dead
list|show|replay|purge``, ``journal verify|dump`` on the directory of a stopped cage, ``status
--connect`` asking a running cage (started here) over the wire, ``run`` as a service stopped by
SIGTERM or Ctrl-C, and the rules every command keeps: a bad command line is click's usage
message and exit code 2, an error of pmq is one line and exit code 1, never a traceback. The
store's read-only accessors those commands use (``Store.queue_report``, ``dead_letter_call``,
``recorded_name``) and the reserved module name ``pmq`` are checked here too.

The data directories come from real cages made here: calls queued to a peer that is not running
stay pending, a handler that raises ``Reject`` makes dead letters, a handler that raises
``Retry`` keeps a loopback call pending. The module-scoped directory is only read; tests that
change a directory work on a copy.

Conventions (tests/helpers.py): data directories under ``tmp_path`` on the real disk, nothing
asserts on time, every wait has the generous ``LIMIT_S``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import pmq
from helpers import LIMIT_S, Log, wait_until
from pmq._format import read_journal

MakeCage = Callable[..., pmq.Cage]

CLI = [sys.executable, "-m", "pmq"]
SEGMENT_BYTES = 256 * 1024


def pmq_cli(
    *args: str | Path, input: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pmq ARGS`` to completion; its exit code, stdout and stderr."""
    return subprocess.run(
        [*CLI, *map(str, args)],
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
        cwd=cwd,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The command failed with `code`, said why in one line on stderr, and showed no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on: a peer that is down."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- a stopped cage's data directory ------------------------------------------------------


class Mod:
    """Handlers of the cage that makes the data directory."""

    def __init__(self) -> None:
        self.log = Log()

    def no(self, account: int, **kwargs: object) -> None:
        """Always rejected: the call goes to the dead letters."""
        self.log.add(("no", account))
        raise pmq.Reject(f"account {account} is closed")

    def later(self, account: int) -> None:
        """Always postponed by an hour: the call stays pending."""
        self.log.add(("later", account))
        raise pmq.Retry(after=3600)


@dataclass
class Stopped:
    """A stopped cage "billing"'s data directory and the calls it holds."""

    data_dir: Path
    rejected: str  # automatic id of a dead letter: mod.no(42, memo="hi")
    user_rejected: str  # "t/1": a dead letter made with id=
    outbound: list[str]  # two calls pending for the peer "ledger", which never ran
    made_after: float  # a time before any of the calls was made


def make_stopped(data_dir: Path) -> Stopped:
    """Run cage "billing" on `data_dir` until it holds pending calls and dead letters; stop it."""
    mod = Mod()
    made_after = time.time()
    # Small segments: the reader in pmq._format checks every 8 bytes after the last frame of
    # the last segment, which takes seconds over the 64 MiB of zeros of a default segment.
    cage = pmq.Cage(
        "billing",
        data_dir,
        peers={"ledger": f"127.0.0.1:{free_port()}"},
        expose={"mod": mod},
        segment_bytes=SEGMENT_BYTES,
    )
    cage.start()
    try:
        outbound = [
            cage.execute.on("ledger_queue").accounts.credit(1, amount=10),
            cage.execute.on("ledger_queue").accounts.credit(2, amount=20),
        ]
        rejected = cage.execute.on("loopback_queue").mod.no(42, memo="hi")
        user_rejected = cage.execute.on("loopback_queue", id="t/1").mod.no(43)
        cage.execute.on("loopback_queue").mod.later(7)
        mod.log.wait_for(3)
        wait_until(lambda: len(cage.dead_letters()) == 2, "two dead letters")
    finally:
        cage.stop()
    return Stopped(data_dir, rejected, user_rejected, outbound, made_after)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Stopped:
    """One stopped cage's data directory, shared by the tests that only read it."""
    return make_stopped(tmp_path_factory.mktemp("cli") / "billing")


@pytest.fixture
def copy(stopped: Stopped, tmp_path: Path) -> Stopped:
    """A copy of the stopped cage's data directory, for a test that changes it."""
    shutil.copytree(stopped.data_dir, tmp_path / "billing")
    return Stopped(
        tmp_path / "billing",
        stopped.rejected,
        stopped.user_rejected,
        stopped.outbound,
        stopped.made_after,
    )


# ---- status --------------------------------------------------------------------------------


def test_status_prints_a_table_of_queues_and_the_journal(stopped: Stopped) -> None:
    """``pmq status DIR`` lists each queue with pending, in flight, dead and oldest age."""
    result = pmq_cli("status", stopped.data_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("QUEUE"))
    assert header.split() == ["QUEUE", "DIRECTION", "PENDING", "IN", "FLIGHT", "DEAD", "OLDEST"]
    rows = {
        line.split()[0]: line.split()
        for line in lines
        if line.split() and line.split()[0].endswith("_queue")
    }
    assert rows["loopback_queue"][1:5] == ["loopback", "1", "0", "2"]
    assert rows["ledger_queue"][1:5] == ["outbound", "2", "0", "0"]
    assert any(line.startswith("journal") for line in lines)
    assert any(line.startswith("checkpoint") and "covers seq" in line for line in lines)


def test_status_json_has_the_same_numbers(stopped: Stopped) -> None:
    """``pmq status --json`` gives per queue counts, the oldest call's time and the journal."""
    result = pmq_cli("status", stopped.data_dir, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    queues = {(q["queue"], q["direction"]): q for q in report["queues"]}
    assert set(queues) == {("loopback_queue", "loopback"), ("ledger_queue", "outbound")}
    loopback, ledger = queues[("loopback_queue", "loopback")], queues[("ledger_queue", "outbound")]
    assert (loopback["pending"], loopback["in_flight"], loopback["dead"]) == (1, 0, 2)
    assert (ledger["pending"], ledger["in_flight"], ledger["dead"], ledger["peer"]) == (
        2,
        0,
        0,
        "ledger",
    )
    for row in (loopback, ledger):
        assert stopped.made_after <= row["oldest_created"] <= time.time()
        assert row["oldest_age_seconds"] >= 0
    assert report["dead"] == 2 and report["running"] is False
    assert report["journal"]["segments"] >= 1 and report["journal"]["bytes"] > 0
    assert report["checkpoint"]["covered"] >= 1


def test_status_refuses_a_directory_in_use(make_cage: MakeCage, tmp_path: Path) -> None:
    """On the directory of a running cage, status and dead say so (with its pid) and exit 1."""
    make_cage("busy", tmp_path / "busy")
    for command in (["status"], ["dead", "list"]):
        line = assert_one_line_error(pmq_cli(*command, tmp_path / "busy"))
        assert f"data directory {tmp_path / 'busy'} is in use by a running cage" in line
        if sys.platform == "linux":
            assert f"(pid {os.getpid()})" in line


def test_status_of_a_directory_that_is_not_a_data_directory(tmp_path: Path) -> None:
    """A directory without a journal is refused in one line, and nothing is created in it."""
    line = assert_one_line_error(pmq_cli("status", tmp_path))
    assert "is not a pmq data directory" in line
    assert list(tmp_path.iterdir()) == []


# ---- status --connect: a running cage, asked over the wire --------------------------------


def make_running(make_cage: MakeCage, tmp_path: Path, **kwargs: object) -> tuple[pmq.Cage, Mod]:
    """Cage "billing", listening, with two calls pending for a peer that is down, one call
    waiting out a retry (in flight) and one dead letter; returned once all of that holds."""
    mod = Mod()
    cage = make_cage(
        "billing",
        tmp_path / "billing",
        listen="127.0.0.1:0",
        peers={"ledger": f"127.0.0.1:{free_port()}"},
        expose={"mod": mod},
        **kwargs,
    )
    cage.execute.on("ledger_queue").accounts.credit(1, amount=10)
    cage.execute.on("ledger_queue").accounts.credit(2, amount=20)
    cage.execute.on("loopback_queue").mod.later(7)
    cage.execute.on("loopback_queue").mod.no(42)
    mod.log.wait_for(2)
    wait_until(lambda: len(cage.dead_letters()) == 1, "one dead letter")
    wait_until(
        lambda: cage.stats()["queues"][("loopback_queue", False)] == {"waiting": 0, "taken": 1},
        "the postponed call waits out its retry",
    )
    return cage, mod


def address_of(cage: pmq.Cage) -> str:
    """``127.0.0.1:PORT`` where `cage` listens."""
    assert cage.address is not None
    return f"127.0.0.1:{cage.address[1]}"


def test_status_connect_asks_a_running_cage(make_cage: MakeCage, tmp_path: Path) -> None:
    """``--connect`` shows a running cage's queues (in flight included), peers and journal."""
    made_after = time.time()
    cage, _ = make_running(make_cage, tmp_path)
    result = pmq_cli("status", "--connect", address_of(cage), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["cage"], report["running"], report["address"]) == (
        "billing",
        True,
        address_of(cage),
    )
    assert report["data_dir"] == str(tmp_path / "billing")
    queues = {(q["queue"], q["direction"]): q for q in report["queues"]}
    assert list(queues) == [("loopback_queue", "loopback"), ("ledger_queue", "outbound")]
    loopback, ledger = queues[("loopback_queue", "loopback")], queues[("ledger_queue", "outbound")]
    assert (loopback["pending"], loopback["in_flight"], loopback["dead"]) == (1, 1, 1)
    assert (ledger["pending"], ledger["in_flight"], ledger["dead"], ledger["peer"]) == (
        2,
        0,
        0,
        "ledger",
    )
    for row in (loopback, ledger):
        assert made_after <= row["oldest_created"] <= report["time"]
    assert report["dead"] == 1 and report["counters"]["enqueued"] == 4
    assert report["dispatch"]["rejected"] == 1 and report["dispatch"]["retried"] == 1
    assert report["peers"]["ledger"]["connected"] is False
    assert report["journal"]["directory"] == str(tmp_path / "billing" / "journal")
    assert report["journal"]["segments"] >= 1 and report["journal"]["bytes"] > 0
    table = pmq_cli("status", "--connect", address_of(cage))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"cage 'billing' at {address_of(cage)} (running)")
    rows = {
        line.split()[0]: line.split() for line in lines if line.partition(" ")[0].endswith("_queue")
    }
    assert rows["loopback_queue"][1:5] == ["loopback", "1", "1", "1"]
    assert rows["ledger_queue"][1:5] == ["outbound", "2", "0", "0"]
    assert any(line.split()[:3] == ["peers", "ledger:", "not"] for line in lines)


def test_status_connect_with_the_cage_secret(
    make_cage: MakeCage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cage with a secret answers --secret or PMQ_SECRET; without it, or a wrong one: 1 line."""
    cage, _ = make_running(make_cage, tmp_path, secret=b"s3cret")
    where = address_of(cage)
    given = pmq_cli("status", "--connect", where, "--secret", "s3cret", "--json")
    assert given.returncode == 0, given.stderr
    assert json.loads(given.stdout)["cage"] == "billing"
    monkeypatch.setenv("PMQ_SECRET", "s3cret")
    from_env = pmq_cli("status", "--connect", where, "--json")
    assert from_env.returncode == 0, from_env.stderr
    for ours, theirs in zip(
        json.loads(from_env.stdout)["queues"], json.loads(given.stdout)["queues"], strict=True
    ):
        del ours["oldest_age_seconds"], theirs["oldest_age_seconds"]  # asked at other times
        assert ours == theirs
    monkeypatch.delenv("PMQ_SECRET")
    missing = assert_one_line_error(pmq_cli("status", "--connect", where))
    assert f"the handshake with {where} failed" in missing and "has none" in missing
    wrong = assert_one_line_error(pmq_cli("status", "--connect", where, "--secret", "guess"))
    assert f"the handshake with {where} failed" in wrong and "wrong secret" in wrong
    assert cage.stats()["counters"]["enqueued"] == 4  # nobody stored anything


def test_status_connect_to_a_cage_without_a_secret_refuses_one(
    make_cage: MakeCage, tmp_path: Path
) -> None:
    """Giving a secret to a cage that has none fails the handshake: one line, exit 1."""
    cage, _ = make_running(make_cage, tmp_path)
    line = assert_one_line_error(pmq_cli("status", "--connect", address_of(cage), "--secret", "x"))
    assert "the handshake with" in line and "secret" in line


def test_status_connect_to_a_port_nothing_listens_on() -> None:
    """Nothing listening: "cannot connect to HOST:PORT" in one line, exit 1."""
    port = free_port()
    line = assert_one_line_error(pmq_cli("status", "--connect", f"127.0.0.1:{port}"))
    assert line.startswith(f"Error: cannot connect to 127.0.0.1:{port}: ")


@contextlib.contextmanager
def not_a_cage(reply: bytes | None) -> Iterator[int]:
    """A TCP listener on 127.0.0.1 that is no cage; yields its port. It accepts one connection,
    reads what comes first, then writes `reply` and closes; with None it says nothing and
    keeps the connection open until the end."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(LIMIT_S)
    held: list[socket.socket] = []

    def serve() -> None:
        try:
            conn, _ = server.accept()
            held.append(conn)
            conn.recv(4096)
            if reply is not None:
                conn.sendall(reply)
                conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the test is over and closed the listener

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        thread.join(LIMIT_S)
        for conn in held:
            conn.close()


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (None, "no answer from 127.0.0.1:{port} within 1 s"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "127.0.0.1:{port} does not answer like a pmq cage"),
        (b"", "the connection was closed during the handshake"),
    ],
    ids=["silent", "garbage", "closes"],
)
def test_status_connect_to_something_that_is_not_a_cage(reply: bytes | None, expected: str) -> None:
    """A listener that says nothing, garbage, or closes at once: one line each, exit 1."""
    with not_a_cage(reply) as port:
        line = assert_one_line_error(
            pmq_cli("status", "--connect", f"127.0.0.1:{port}", "--timeout", "1")
        )
    assert expected.format(port=port) in line


def test_status_connect_takes_an_address_and_no_data_dir(tmp_path: Path) -> None:
    """A bad address, or an address and DATA_DIR together, is a usage error: exit 2."""
    for args in (["--connect", "127.0.0.1"], ["--connect", "127.0.0.1:1", str(tmp_path)]):
        result = pmq_cli("status", *args)
        assert result.returncode == 2, (result.stdout, result.stderr)
        assert "Usage: pmq status" in result.stderr and "Traceback" not in result.stderr


def test_pmq_is_a_reserved_module_name(make_cage: MakeCage, tmp_path: Path) -> None:
    """No cage exposes a module "pmq": expose(), expose= and a config file all refuse it."""
    with pytest.raises(ValueError, match="'pmq': it is reserved"):
        make_cage("a", start=False).expose("pmq", Mod())
    with pytest.raises(ValueError, match="'pmq': it is reserved"):
        pmq.Cage("b", tmp_path / "b", expose={"pmq": Mod()})
    config = tmp_path / "reserved.toml"
    config.write_text('name = "c"\ndata_dir = "d"\n[expose]\npmq = "json"\n')
    line = assert_one_line_error(pmq_cli("run", config))
    assert "'pmq': it is reserved" in line


def test_pmq_status_is_callable_by_a_peer_and_never_queued(
    make_cage: MakeCage, tmp_path: Path
) -> None:
    """A peer gets pmq.status() by RPC; a queued call to pmq.status is refused as not exposed."""
    cage, _ = make_running(make_cage, tmp_path)
    peer = make_cage("peer", peers={"billing": address_of(cage)})
    answer = peer.execute.on("billing", timeout=LIMIT_S).pmq.status()
    assert answer["cage"] == "billing" and answer["dead"] == 1
    assert answer["peers"]["ledger"]["connected"] is False
    with pytest.raises(pmq.RemoteError, match=r"pmq\.nothing is not one of pmq's own methods"):
        peer.execute.on("billing", timeout=LIMIT_S).pmq.nothing()
    with pytest.raises(pmq.RemoteError, match="takes no arguments"):
        peer.execute.on("billing", timeout=LIMIT_S).pmq.status(1)
    call = peer.execute.on("billing_queue").pmq.status()
    peer.drain(timeout=LIMIT_S)
    assert peer.call_status(call)[:2] == ("dead", "refused")


# ---- the store's inspection accessors (what the commands ask) -------------------------------


def test_queue_report_changes_nothing_and_finds_the_oldest_call(copy: Stopped) -> None:
    """``Store.queue_report`` counts each queue, hands nothing out and appends nothing."""
    from pmq.store import Store

    store = Store(str(copy.data_dir), "billing")
    try:
        next_seq = store.journal.next_seq
        report = {(q["queue"], q["outbound"]): q for q in store.queue_report()}
        assert store.journal.next_seq == next_seq
        assert set(report) == {("loopback_queue", False), ("ledger_queue", True)}
        ledger = report[("ledger_queue", True)]
        assert (ledger["pending"], ledger["in_flight"], ledger["dead"]) == (2, 0, 0)
        assert (
            report[("loopback_queue", False)]["pending"],
            report[("loopback_queue", False)]["dead"],
        ) == (1, 2)
        [head] = store.take("ledger_queue", 1, outbound=True)  # still there to be handed out
        assert head.call_id == copy.outbound[0]
        assert ledger["oldest_created"] == head.created
        in_flight = {(q["queue"], q["outbound"]): q for q in store.queue_report()}
        assert in_flight[("ledger_queue", True)]["in_flight"] == 1
        assert in_flight[("ledger_queue", True)]["oldest_created"] == head.created
        store.give_back([head])
    finally:
        store.close()


def test_dead_letter_call_and_recorded_name(stopped: Stopped, tmp_path: Path) -> None:
    """``dead_letter_call`` gives a dead letter's record; ``recorded_name`` its cage's name."""
    from pmq._codec import unpack_arguments
    from pmq.store import Store

    shutil.copytree(stopped.data_dir, tmp_path / "billing")
    store = Store(str(tmp_path / "billing"), "billing")
    try:
        assert store.recorded_name() == "billing"
        record = store.dead_letter_call(stopped.rejected)
        assert (record["user_id"], record["deadline"], record["outbound"]) == (None, None, False)
        assert unpack_arguments(record["arguments"]) == ([42], {"memo": "hi"})
        assert stopped.made_after <= record["created"] <= time.time()
        assert store.dead_letter_call("t/1", "billing")["user_id"] == "t/1"
        with pytest.raises(KeyError, match="'nope' is not a dead letter"):
            store.dead_letter_call("nope")
    finally:
        store.close()


def test_recorded_name_ignores_dead_letters_from_other_cages(
    make_cage: MakeCage, tmp_path: Path
) -> None:
    """A cage whose only dead letter came from a peer has no recorded name; the peer has one."""
    target = make_cage("target", listen="127.0.0.1:0", expose={"mod": Mod()})
    source = make_cage("source", peers={"target": address_of(target)})
    source.execute.on("target_queue").mod.no(1)  # rejected on target: its dead letter
    source.execute.on("target_queue").absent.call()  # refused: a dead letter on source
    source.drain(timeout=LIMIT_S)
    wait_until(lambda: len(target.dead_letters()) == 1, "the rejected call is dead on target")
    assert target.store is not None and source.store is not None
    assert target.store.recorded_name() is None
    assert source.store.recorded_name() == "source"
    [letter] = target.dead_letters()
    assert target.store.dead_letter_call(letter.call_id, "source")["outbound"] is False
    [refused] = source.dead_letters()
    assert source.store.dead_letter_call(refused.call_id)["outbound"] is True


# ---- dead letters --------------------------------------------------------------------------


def test_dead_list_shows_every_dead_letter(stopped: Stopped) -> None:
    """``pmq dead list`` prints id, queue, method, reason, when and attempts of each."""
    result = pmq_cli("dead", "list", stopped.data_dir)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["ID", "QUEUE", "METHOD", "REASON", "WHEN", "ATTEMPTS"]
    assert [row.split()[:4] for row in rows] == [
        [stopped.rejected, "loopback_queue", "mod.no", "rejected"],
        [stopped.user_rejected, "loopback_queue", "mod.no", "rejected"],
    ]
    assert all(row.split()[-1] == "1" for row in rows)


def test_dead_list_json(stopped: Stopped) -> None:
    """``pmq dead list --json`` gives each dead letter's fields."""
    result = pmq_cli("dead", "list", stopped.data_dir, "--json")
    assert result.returncode == 0, result.stderr
    letters = json.loads(result.stdout)
    assert [(d["call_id"], d["reason"], d["detail"], d["source"]) for d in letters] == [
        (stopped.rejected, "rejected", "account 42 is closed", "billing"),
        (stopped.user_rejected, "rejected", "account 43 is closed", "billing"),
    ]


def test_dead_show_decodes_the_arguments(stopped: Stopped) -> None:
    """``pmq dead show`` prints the reason, the detail and the decoded arguments."""
    result = pmq_cli("dead", "show", stopped.data_dir, stopped.rejected)
    assert result.returncode == 0, result.stderr
    fields = dict(
        line.split(None, 1) for line in result.stdout.splitlines() if len(line.split(None, 1)) == 2
    )
    assert fields["id"] == stopped.rejected and fields["call"] == "mod.no"
    assert fields["reason"] == "rejected" and fields["args"] == "[42]"
    assert fields["kwargs"] == "{'memo': 'hi'}"
    assert "account 42 is closed" in result.stdout
    shown = json.loads(pmq_cli("dead", "show", stopped.data_dir, "t/1", "--json").stdout)
    assert shown["user_id"] == "t/1" and shown["arguments"] == {"args": [43], "kwargs": {}}


def test_dead_show_of_an_unknown_id_is_one_line(stopped: Stopped) -> None:
    """An id that is not a dead letter: one line naming it, exit code 1."""
    line = assert_one_line_error(pmq_cli("dead", "show", stopped.data_dir, "nope"))
    assert "'nope' is not a dead letter" in line


def test_dead_replay_sends_the_call_back_to_its_queue(copy: Stopped) -> None:
    """After ``pmq dead replay`` the call is pending again and runs when the cage starts."""
    result = pmq_cli("dead", "replay", copy.data_dir, copy.rejected)
    assert result.returncode == 0, result.stderr
    assert f"replayed {copy.rejected}" in result.stdout
    listed = json.loads(pmq_cli("dead", "list", copy.data_dir, "--json").stdout)
    assert [d["call_id"] for d in listed] == [copy.user_rejected]
    report = json.loads(pmq_cli("status", copy.data_dir, "--json").stdout)
    [loopback] = [q for q in report["queues"] if q["queue"] == "loopback_queue"]
    assert (loopback["pending"], loopback["dead"]) == (2, 1)
    ran = Log()

    class Fixed:
        def no(self, account: int, **kwargs: object) -> None:
            ran.add((account, kwargs))

        def later(self, account: int) -> None:
            pass

    with pmq.Cage("billing", copy.data_dir, expose={"mod": Fixed()}):
        assert ran.wait_for(1)[0] == (42, {"memo": "hi"})


def test_dead_purge_asks_before_deleting(copy: Stopped) -> None:
    """``pmq dead purge`` asks first: "n" keeps the letter, "y" (or --yes) deletes it."""
    kept = pmq_cli("dead", "purge", copy.data_dir, copy.user_rejected, input="n\n")
    assert kept.returncode == 1 and "for good?" in kept.stdout
    assert "Traceback" not in kept.stdout + kept.stderr
    assert len(json.loads(pmq_cli("dead", "list", copy.data_dir, "--json").stdout)) == 2
    purged = pmq_cli("dead", "purge", copy.data_dir, copy.user_rejected, input="y\n")
    assert purged.returncode == 0 and f"purged {copy.user_rejected}" in purged.stdout
    result = pmq_cli("dead", "purge", copy.data_dir, copy.rejected, "--yes", "--source", "billing")
    assert result.returncode == 0, result.stderr
    assert pmq_cli("dead", "list", copy.data_dir).stdout.strip() == "no dead letters"
    again = assert_one_line_error(pmq_cli("dead", "purge", copy.data_dir, copy.rejected, "-y"))
    assert "is not a dead letter" in again


# ---- journal -------------------------------------------------------------------------------


def test_journal_verify_passes_a_clean_journal(stopped: Stopped) -> None:
    """``pmq journal verify`` on a data directory or its journal: counts, "clean", exit 0."""
    for path in (stopped.data_dir, stopped.data_dir / "journal"):
        result = pmq_cli("journal", "verify", path)
        assert result.returncode == 0, result.stdout + result.stderr
        fields = dict(line.split(None, 1) for line in result.stdout.splitlines())
        assert fields["result"] == "clean" and fields["tail"] == "clean"
        assert fields["segments"].startswith("1 (") and fields["records"].startswith(
            f"{len(read_journal(stopped.data_dir / 'journal').records)} ("
        )


def test_journal_verify_finds_a_flipped_byte(copy: Stopped) -> None:
    """A flipped byte in a frame: verify names file and offset, exits 1; status refuses too."""
    [segment] = read_journal(copy.data_dir / "journal").segments
    data = [frame for frame in segment.frames if not frame.control]
    frame = data[len(data) // 2]  # a damaged control frame (CLOSE) may pass for a torn tail
    with open(segment.path, "r+b") as file:
        file.seek(frame.offset + frame.frame_len // 2)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0x55]))
    result = pmq_cli("journal", "verify", copy.data_dir)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert f"{segment.path} at offset {frame.offset}:" in result.stdout
    assert "CORRUPT" in result.stdout
    for command in (["status"], ["dead", "list"], ["journal", "dump"]):
        line = assert_one_line_error(pmq_cli(*command, copy.data_dir))
        assert f"{segment.path} at offset {frame.offset}" in line


def test_journal_dump_prints_records(stopped: Stopped) -> None:
    """``pmq journal dump`` prints seq, kind, bytes; --from/--limit choose; --decode decodes."""
    records = read_journal(stopped.data_dir / "journal").records
    result = pmq_cli("journal", "dump", stopped.data_dir)
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split() == ["SEQ", "KIND", "BYTES"]
    assert [int(line.split()[0]) for line in lines] == [seq for seq, _ in records]
    kinds = [line.split()[1] for line in lines]
    assert kinds[0] == "CALL" and kinds.count("CALL") == 5  # the handlers may run in between
    assert {"ATTEMPT", "DEAD"} <= set(kinds)
    some = pmq_cli("journal", "dump", stopped.data_dir, "--from", "2", "--limit", "2").stdout
    assert [int(line.split()[0]) for line in some.splitlines()[1:]] == [2, 3]
    decoded = pmq_cli("journal", "dump", stopped.data_dir / "journal", "--decode", "--limit", "5")
    calls = decoded.stdout.splitlines()[1:]
    assert "module='accounts' method='credit'" in calls[0]
    assert "arguments=(args=[1], kwargs={'amount': 10})" in calls[0]
    assert any("arguments=(args=[42], kwargs={'memo': 'hi'})" in line for line in calls)


# ---- the command line itself ---------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["nosuch"],
        ["status"],
        ["dead", "list", ".", "--bogus"],
        ["journal", "dump", ".", "--limit", "many"],
        ["run", "/nonexistent/cage.toml"],
    ],
)
def test_bad_arguments_give_usage_and_exit_2(args: list[str], tmp_path: Path) -> None:
    """A bad command line prints click's usage message and exits 2, with no traceback."""
    result = pmq_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Usage: pmq" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


COMMANDS = [
    [],
    ["run"],
    ["status"],
    ["dead"],
    ["dead", "list"],
    ["dead", "show"],
    ["dead", "replay"],
    ["dead", "purge"],
    ["journal"],
    ["journal", "verify"],
    ["journal", "dump"],
    ["demo"],
    ["bench"],
]


def test_every_command_has_help_and_checks_its_arguments(tmp_path: Path) -> None:
    """``--help`` works on every command, and each refuses a bad option with exit code 2."""
    # In this process (click's CliRunner), not in 26 subprocesses: the parsing is the same.
    from click.testing import CliRunner

    from pmq.cli import cli

    runner = CliRunner()
    for command in COMMANDS:
        result = runner.invoke(cli, [*command, "--help"], prog_name="pmq")
        assert result.exit_code == 0, (command, result.output)
        assert result.output.startswith(f"Usage: pmq {' '.join(command)}".rstrip()), command
        if command in (["demo"], ["bench"]):
            continue  # they hand their arguments to the demo and the benchmark
        result = runner.invoke(cli, [*command, "--no-such-option"], prog_name="pmq")
        assert result.exit_code == 2 and "No such option" in result.output, command


def test_version() -> None:
    """``pmq --version`` prints the package's version."""
    result = pmq_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"pmq, version {pmq.__version__}"


def test_demo_without_its_module_says_it_is_not_available() -> None:
    """When pmq._demo cannot be imported, ``pmq demo`` says so in one line and exits 2."""
    code = "import sys; sys.modules['pmq._demo'] = None; from pmq.cli import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", code, "demo"],
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
        stdin=subprocess.DEVNULL,
    )
    line = assert_one_line_error(result, code=2)
    assert line.startswith("pmq demo is not available in this installation: ")


# ---- pmq run -------------------------------------------------------------------------------

PROBE = '''\
"""Handlers of the cage that `pmq run` serves in test_cli.py."""
import os
import time


def record(text):
    """Append `text` to the file $PMQ_CLI_RECORD, durably."""
    with open(os.environ["PMQ_CLI_RECORD"], "a") as file:
        file.write(text + "\\n")
        file.flush()
        os.fsync(file.fileno())


def block(text):
    """Record `text`, then take a minute."""
    record("started " + text)
    time.sleep(60)
'''


class Served:
    """A ``pmq run`` subprocess, with its stdout lines as they come."""

    def __init__(self, tmp_path: Path) -> None:
        modules = tmp_path / "modules"
        modules.mkdir()
        (modules / "cli_probe.py").write_text(PROBE)
        self.record = tmp_path / "record.txt"
        config = tmp_path / "server.toml"
        config.write_text(
            'name = "server"\ndata_dir = "server-data"\n'
            'listen = "127.0.0.1:0"\n[expose]\nprobe = "cli_probe"\n'
        )
        env = {**os.environ, "PYTHONPATH": str(modules), "PMQ_CLI_RECORD": str(self.record)}
        self.process = subprocess.Popen(
            [*CLI, "run", str(config), "--log-level", "debug"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._errors: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_errors, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def _read_errors(self) -> None:
        assert self.process.stderr is not None
        self._errors.extend(self.process.stderr)  # debug logs: the pipe must never fill up

    @property
    def stderr(self) -> str:
        """What it wrote to stderr (all of it once ``wait`` returned)."""
        return "".join(self._errors)

    def expect(self, words: str) -> str:
        """The next stdout line that contains `words` (fail if none comes)."""
        deadline = time.monotonic() + LIMIT_S
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {words!r} from pmq run") from None
            if words in line:
                return line

    def recorded(self) -> list[str]:
        """What the exposed handlers wrote so far."""
        return self.record.read_text().splitlines() if self.record.exists() else []

    def wait(self) -> int:
        """Its exit code, once it has exited and its output has been read."""
        code = self.process.wait(timeout=LIMIT_S)
        for reader in self._readers:
            reader.join(LIMIT_S)
        for pipe in (self.process.stdout, self.process.stderr):
            assert pipe is not None
            pipe.close()
        return code


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """``pmq run`` on a config in tmp_path that exposes tests' probe module; killed at the end."""
    server = Served(tmp_path)
    yield server
    if server.process.poll() is None:
        server.process.kill()
        server.wait()


def listening_port(line: str) -> int:
    """The port in ``pmq: cage 'server' listening on 127.0.0.1:PORT, ...``."""
    address = line.split(" listening on ", 1)[1].split(",", 1)[0]
    return int(address.rsplit(":", 1)[1])


def test_run_serves_calls_and_stops_on_sigterm(served: Served, make_cage: MakeCage) -> None:
    """``pmq run`` says where it listens, runs a queued call, and exits 0 on SIGTERM."""
    port = listening_port(served.expect("listening on 127.0.0.1:"))
    client = make_cage("client", peers={"server": f"127.0.0.1:{port}"})
    client.execute.on("server_queue").probe.record("hello")
    client.drain(timeout=LIMIT_S)  # the server has accepted it
    wait_until(lambda: served.recorded() == ["hello"], "the served cage ran the call")
    served.process.send_signal(signal.SIGTERM)
    # Exit code 0 rules out an exception that pmq run did not handle; its log (stderr) is the
    # cage's, where asyncio may report the transport's cancelled connections.
    assert served.wait() == 0, served.stderr
    assert "stopped" in served.expect("cage 'server' stopped")


def test_run_second_ctrl_c_exits_at_once(served: Served, make_cage: MakeCage) -> None:
    """The first Ctrl-C waits for a running handler; the second exits at once with 130."""
    port = listening_port(served.expect("listening on"))
    client = make_cage("client", peers={"server": f"127.0.0.1:{port}"})
    client.execute.on("server_queue").probe.block("slow")
    wait_until(lambda: served.recorded() == ["started slow"], "the slow handler started")
    served.process.send_signal(signal.SIGINT)
    served.expect("stopping cage 'server' (SIGINT)")
    served.process.send_signal(signal.SIGINT)
    assert served.wait() == 130
    assert "exiting at once" in served.stderr


def test_run_with_a_bad_config_is_one_line(tmp_path: Path) -> None:
    """A config with an unknown key, or an expose that cannot be imported: one line, exit 1."""
    bad_key = tmp_path / "bad.toml"
    bad_key.write_text('name = "x"\ndata_dir = "d"\nworkerz = 3\n')
    line = assert_one_line_error(pmq_cli("run", bad_key))
    assert "workerz" in line and "did you mean 'workers'" in line
    no_module = tmp_path / "nomodule.toml"
    no_module.write_text('name = "x"\ndata_dir = "d"\n[expose]\nm = "no_such_module_here"\n')
    line = assert_one_line_error(pmq_cli("run", no_module))
    assert "cannot import a module to expose" in line and "no_such_module_here" in line
