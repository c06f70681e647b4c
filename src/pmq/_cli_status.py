"""``pmq status``: per queue and peer, what a cage holds; from its data directory or over TCP.

Why a module of its own: ``status`` is the one command with two sources, a stopped cage's data
directory (opened through ``Store``) and a running cage (asked over the wire protocol as a
client cage), and both must print the same table and JSON; that is enough for its own module,
and it keeps ``pmq.cli`` small.

Owns: the ``status`` command, the report it prints (``report_of_store``, ``report_of_answer``:
one row per queue with pending, in flight, dead and the age of the oldest call) and the client
side of ``pmq.status``: connect, handshake as cage ``CLIENT_NAME`` (with the shared secret, if
any), one REQUEST, one RESPONSE, GOODBYE. Must not: read a store's private state, parse frames
(``pmq.protocol`` does), or speak TLS (``--connect`` is plain TCP, with the HMAC handshake when
the cage has a secret; docs/cli.md says so).

Invariants: whatever goes wrong on the way to a running cage (no such address, nothing
listening, a wrong or missing secret, no answer in time, something that is not a cage) ends as
one line and exit code 1, never a traceback; the client changes nothing on the cage (the
accepting side stores nothing for a client that sends no calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from typing import Any

import click

from pmq import protocol
from pmq._checkpoint import FILENAME as CHECKPOINT_FILENAME
from pmq._checkpoint import read_checkpoint
from pmq._cli_common import age, data_dir_of, opened_store, plural, size, table, when
from pmq._codec import pack_arguments, unpack_arguments
from pmq._config import parse_address
from pmq._names import RESERVED_MODULE
from pmq.cage import LOOPBACK_QUEUE
from pmq.errors import AuthenticationError, ProtocolError, RemoteProtocolError, TransportError
from pmq.store import Store
from pmq.transport import READ_BYTES, read_events

__all__ = ["CLIENT_NAME", "ask_cage", "report_of_answer", "report_of_store", "status"]

#: The cage name ``pmq status --connect`` gives in its handshake (it shows in the cage's log).
CLIENT_NAME = "pmq-status"
DEFAULT_TIMEOUT_S = 10.0


@click.command()
@click.argument("data_dir", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--connect", metavar="HOST:PORT", help="Ask the running cage listening there.")
@click.option(
    "--secret",
    envvar="PMQ_SECRET",
    metavar="TEXT",
    help="The cage's shared secret, as in its config (env PMQ_SECRET, which ps does not show).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    metavar="SECONDS",
    help="With --connect: give up after this long.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(
    data_dir: str | None, connect: str | None, secret: str | None, timeout: float, as_json: bool
) -> None:
    """Queues, dead letters and journal of a stopped cage, or of a running one (--connect).

    DATA_DIR is a stopped cage's data directory; --connect HOST:PORT asks a running cage where
    it listens instead (plain TCP, with --secret when the cage has one).

    Per queue: calls pending, in flight (handed out: running or sent, not yet acknowledged),
    dead letters, and the age of the oldest pending call.
    """
    if connect is not None:
        if data_dir is not None:
            raise click.UsageError("give DATA_DIR or --connect, not both")
        try:
            host, port = parse_address(connect)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--connect'") from None
        key = secret.encode() if secret else None
        answer = ask_cage(host, port, key, timeout)
        _print(report_of_answer(answer, connect), as_json)
        return
    if data_dir is None:
        raise click.UsageError("missing DATA_DIR (or --connect HOST:PORT)")
    directory = data_dir_of(data_dir)
    with opened_store(directory) as store:
        report = report_of_store(store, time.time())
    _print(report, as_json)


# ---- the report ------------------------------------------------------------------------------


def _rows(queues: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """``Store.queue_report`` as ``pmq status`` shows it: loopback first, then inbound, then
    outbound; the direction and peer spelt out; the oldest call's age at `now`."""
    rows = []
    for q in sorted(
        queues, key=lambda q: (q["outbound"], q["queue"] != LOOPBACK_QUEUE, q["queue"])
    ):
        name, oldest = q["queue"], q["oldest_created"]
        peer = None if name == LOOPBACK_QUEUE else name.removesuffix("_queue")
        rows.append(
            {
                "queue": name,
                "direction": "outbound"
                if q["outbound"]
                else "loopback"
                if peer is None
                else "inbound",
                "peer": peer,
                "pending": q["pending"],
                "in_flight": q["in_flight"],
                "dead": q["dead"],
                "oldest_created": oldest,
                "oldest_age_seconds": None if oldest is None else max(0.0, now - oldest),
            }
        )
    return rows


def report_of_store(store: Store, now: float) -> dict[str, Any]:
    """What ``pmq status DATA_DIR`` shows of a stopped cage's store, as plain data (--json)."""
    rows = _rows(store.queue_report(), now)
    journal = store.journal
    segments = journal.segments()
    checkpoint = read_checkpoint(store.directory)  # the cage's own: ours is written at close
    checkpoint_path = os.path.join(store.directory, CHECKPOINT_FILENAME)
    return {
        "data_dir": store.directory,
        "running": False,
        "queues": rows,
        "dead": sum(row["dead"] for row in rows),
        "journal": {
            "directory": journal.directory,
            "segments": len(segments),
            "bytes": sum(s.size_bytes for s in segments),
            "floor": journal.floor,
            "next_seq": journal.next_seq,
        },
        "checkpoint": None
        if checkpoint is None
        else {
            "path": checkpoint_path,
            "covered": checkpoint["covered"],
            "records_after": max(0, journal.next_seq - 1 - checkpoint["covered"]),
            "written": os.path.getmtime(checkpoint_path),
            "bytes": os.path.getsize(checkpoint_path),
        },
    }


def report_of_answer(answer: dict[str, Any], address: str) -> dict[str, Any]:
    """What ``pmq status --connect`` shows of a running cage's ``pmq.status`` answer: the
    report of a data directory (ages by the cage's clock), plus its name, peers and counters."""
    try:
        return {
            "address": address,
            "cage": answer["cage"],
            "data_dir": answer["data_dir"],
            "running": True,
            "queues": _rows(answer["queues"], answer["time"]),
            "dead": answer["dead"],
            "journal": {
                **answer["journal_files"],
                "next_seq": answer["journal"]["next_seq"],
                "durable_seq": answer["journal"]["durable_seq"],
            },
            "peers": answer["peers"],
            "counters": answer["counters"],
            "journal_stats": answer["journal"],
            "dispatch": answer.get("dispatch"),
            "transport": answer.get("transport"),
            "time": answer["time"],
        }
    except (KeyError, TypeError) as exc:
        raise click.ClickException(
            f"the cage at {address} answered pmq.status in a shape this pmq does not know "
            f"({type(exc).__name__}: {exc})"
        ) from None


def _print(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    if report["running"]:
        click.echo(
            f"cage {report['cage']!r} at {report['address']} (running), data directory "
            f"{report['data_dir']}\n"
        )
    else:
        click.echo(f"data directory  {report['data_dir']} (stopped)\n")
    rows = [
        (
            q["queue"],
            q["direction"],
            *map(str, (q["pending"], q["in_flight"], q["dead"])),
            age(q["oldest_age_seconds"]),
        )
        for q in report["queues"]
    ]
    headers = ["QUEUE", "DIRECTION", "PENDING", "IN FLIGHT", "DEAD", "OLDEST"]
    click.echo(table(headers, rows, right={2, 3, 4, 5}) if rows else "no queues")
    click.echo("")
    for index, (peer, link) in enumerate(sorted(report.get("peers", {}).items())):
        state = "connected" if link["connected"] else f"not connected: {link['last_error']}"
        click.echo(f"{'peers' if index == 0 else '':<15} {peer}: {state}")
    journal = report["journal"]
    durable = f", durable seq {journal['durable_seq']}" if "durable_seq" in journal else ""
    click.echo(f"journal         {journal['directory']}")
    click.echo(
        f"                {plural(journal['segments'], 'segment')}, "
        f"{size(journal['bytes'])} on disk, next seq {journal['next_seq']}{durable}, "
        f"floor {journal['floor']}"
    )
    if report["running"]:
        return
    checkpoint = report["checkpoint"]
    if checkpoint is None:
        click.echo("checkpoint      none yet: the next start reads the whole journal")
    else:
        click.echo(
            f"checkpoint      covers seq {checkpoint['covered']} "
            f"({checkpoint['records_after']} records after it), written "
            f"{when(checkpoint['written'], time.time())}"
        )


# ---- asking a running cage -------------------------------------------------------------------


def ask_cage(host: str, port: int, secret: bytes | None, timeout: float) -> dict[str, Any]:
    """The answer of the cage listening at `host`:`port` to ``pmq.status()``.

    Args:
        host, port: where the cage listens.
        secret: its shared secret, or None for a cage without one.
        timeout: seconds for the whole exchange, connecting included.

    Returns:
        The decoded answer (``pmq._admin``): the cage's ``stats()`` with a report per queue.

    Raises:
        click.ClickException: anything that went wrong, in one line.
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        return asyncio.run(_ask(host, port, secret, timeout))
    except TimeoutError:
        raise click.ClickException(f"no answer from {where} within {timeout:g} s") from None
    except AuthenticationError as exc:
        raise click.ClickException(
            f"the handshake with {where} failed: {exc} (give the cage's secret with --secret "
            f"or PMQ_SECRET)"
        ) from None
    except RemoteProtocolError as exc:
        raise click.ClickException(f"{where} does not answer like a pmq cage: {exc}") from None
    except (TransportError, ProtocolError) as exc:
        raise click.ClickException(f"{where}: {exc}") from None
    except OSError as exc:  # refused, unreachable, unknown host
        raise click.ClickException(f"cannot connect to {where}: {exc.strerror or exc}") from None


async def _ask(host: str, port: int, secret: bytes | None, timeout: float) -> dict[str, Any]:
    conn = protocol.Connection("client", CLIENT_NAME, os.urandom(16), secret=secret)
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port, limit=READ_BYTES)
        try:
            writer.write(conn.initiate())
            return await _exchange(reader, writer, conn, timeout)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    conn: protocol.Connection,
    timeout: float,
) -> dict[str, Any]:
    """Handshake, one REQUEST for ``pmq.status``, its RESPONSE decoded; then GOODBYE."""
    peer = ""
    async for event in read_events(reader, writer, conn):
        if isinstance(event, protocol.Established):
            peer = event.peer
            request = protocol.Request(
                1, RESERVED_MODULE, "status", pack_arguments([], {}), timeout
            )
            writer.write(conn.send(request))
        elif isinstance(event, protocol.Response):
            writer.write(conn.send(protocol.Goodbye(f"{CLIENT_NAME}: done")))
            return _decode(event, peer)
        elif isinstance(event, protocol.Goodbye):
            if not peer:
                raise AuthenticationError(f"the cage refused the handshake: {event.reason}")
            raise TransportError(f"cage {peer} closed the connection: {event.reason}")
        # ACK (the accepting side's first word on every connection), PING, PONG: nothing to do
    if not peer:
        raise TransportError(
            "the connection was closed during the handshake (a cage that requires TLS "
            "does that: pmq status --connect speaks plain TCP)"
        )
    raise TransportError(f"cage {peer} closed the connection before it answered")


def _decode(response: protocol.Response, peer: str) -> dict[str, Any]:
    if not response.ok:
        assert response.error is not None
        kind, message, _ = response.error
        raise TransportError(f"cage {peer} cannot answer pmq.status: {kind}: {message}")
    assert response.result is not None
    try:
        answer = unpack_arguments(response.result)[0][0]
    except (ValueError, IndexError) as exc:
        raise RemoteProtocolError(f"cage {peer} answered pmq.status with {exc}") from None
    if not isinstance(answer, dict):
        raise RemoteProtocolError(f"cage {peer} answered pmq.status with a {type(answer).__name__}")
    return answer
