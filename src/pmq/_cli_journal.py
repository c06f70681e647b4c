"""``pmq journal verify | dump``: check or print a journal with the independent reader.

Why a module of its own: these commands read files through ``pmq._format`` (the small reader of
docs/FORMAT.md) and never open a store, unlike the rest of the ``pmq`` command; keeping them
apart keeps ``pmq.cli`` small and makes plain that they take no lock.

Owns: the two commands, their output, and the names of the store's record kinds and fields for
``dump --decode`` (``RECORDS``). Must not: write anything, take the data directory's lock, or
decode a record any other way than ``msgpack`` does for the store.

Invariants: a corrupt journal is never a traceback: ``verify`` says where (file and offset) and
exits 1, ``dump`` refuses in one line; a record that does not decode is printed as ``?``, not
skipped.

Interim: the layout of store records is spelt out in ``RECORDS`` until ``_calls.py`` (which owns
the layout) names the fields itself.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click
import msgpack

from pmq._calls import K_ATTEMPT, K_CALL, K_DEAD, K_DONE, K_FAIL, K_PURGE, K_REVIVE
from pmq._checkpoint import read_checkpoint
from pmq._cli_common import EXIT_ERROR, journal_dir_of, lock_holder, problem, size, stamp
from pmq._codec import unpack_arguments
from pmq._format import SEGMENT_HEADER_BYTES, read_journal
from pmq._links import K_LINK
from pmq.errors import JournalCorruption

__all__ = ["RECORDS", "journal"]

#: Each store record kind: its name, and its items after the kind (pmq/_calls.py, _links.py).
RECORDS: dict[int, tuple[str, list[str]]] = {
    kind: (name, fields.split())
    for kind, name, fields in [
        (
            K_CALL,
            "CALL",
            "key queue outbound user_id module method arguments deadline created source source_id",
        ),
        (K_ATTEMPT, "ATTEMPT", "attempts"),
        (K_FAIL, "FAIL", "attempts"),
        (K_DONE, "DONE", "keys freed"),
        (K_DEAD, "DEAD", "key queue outbound reason detail at argument_bytes"),
        (K_REVIVE, "REVIVE", "key"),
        (K_PURGE, "PURGE", "key"),
        (K_LINK, "LINK", "source journal_id high refused settled"),
    ]
}
_PAIRED_FIELDS = frozenset({"attempts", "freed", "refused"})  # flat [a, b, a, b, ...] lists
_TIME_FIELDS = frozenset({"deadline", "created", "at"})


@click.group()
def journal() -> None:
    """Check or print a journal (with the reader of docs/FORMAT.md)."""


@journal.command("verify")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def journal_verify(path: str) -> None:
    """Read every segment of the journal at PATH (a data directory or a journal directory).

    Exits 0 when a cage would open it without losing anything acknowledged, 1 when it is
    corrupt. It takes no lock: on a running cage's journal it checks a snapshot.
    """
    directory = journal_dir_of(path)
    click.echo(f"journal     {directory}")
    holder = lock_holder(os.path.join(directory, "LOCK"))
    if holder is not None:
        click.echo(f"note        in use by pid {holder}: this checks a snapshot")
    try:
        report = read_journal(directory)
    except JournalCorruption as exc:
        click.echo(f"problem     {problem(exc)}")
        click.echo(
            "result      CORRUPT: a cage refuses to open this journal; restore it from a "
            "backup (docs/journal.md: on_corruption)"
        )
        sys.exit(EXIT_ERROR)
    on_disk = sum(os.path.getsize(scan.path) for scan in report.segments)
    used = sum(scan.end_offset - SEGMENT_HEADER_BYTES for scan in report.segments)
    click.echo(
        f"segments    {len(report.segments)} ({size(on_disk)} on disk, {size(used)} in frames)"
    )
    click.echo(
        f"records     {len(report.records)} (next seq {report.next_seq}, floor {report.floor})"
    )
    if report.obsolete:
        click.echo(
            f"obsolete    {len(report.obsolete)} segments below the floor (a cage "
            "deletes them when it opens the journal)"
        )
    if report.tail == "torn":
        click.echo(
            f"tail        torn at {report.tail_path} offset {report.tail_offset}: bytes "
            "never acknowledged, which a cage cuts off when it opens the journal"
        )
    else:
        click.echo("tail        clean")
    damage = _check_checkpoint(path, directory)
    if damage is not None:
        click.echo(f"problem     {damage}")
        click.echo("result      CORRUPT: the checkpoint is damaged; a cage refuses to start")
        sys.exit(EXIT_ERROR)
    click.echo("result      clean")


def _check_checkpoint(path: str, journal_dir: str) -> str | None:
    """Read the checkpoint beside the journal when PATH was a data directory; show it."""
    data_dir = os.path.dirname(journal_dir)
    if os.path.abspath(path) != data_dir:
        return None
    try:
        state = read_checkpoint(data_dir)
    except JournalCorruption as exc:
        return problem(exc)
    if state is None:
        click.echo("checkpoint  none")
    else:
        click.echo(f"checkpoint  covers seq {state['covered']}")
    return None


@journal.command("dump")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--from",
    "from_seq",
    type=click.IntRange(min=1),
    default=1,
    metavar="SEQ",
    help="Start at this sequence number.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Print at most N records.",
)
@click.option("--decode", is_flag=True, help="Decode each store record (arguments too).")
def journal_dump(path: str, from_seq: int, limit: int | None, decode: bool) -> None:
    """Print the records of the journal at PATH: seq, store record kind, size.

    PATH is a data directory or a journal directory. Records below the journal's floor
    (obsolete) are not shown.
    """
    directory = journal_dir_of(path)
    try:
        report = read_journal(directory)
    except JournalCorruption as exc:
        raise click.ClickException(
            f"journal is corrupt: {problem(exc)} (pmq journal verify tells more)"
        ) from None
    click.echo(f"{'SEQ':>8}  {'KIND':<8} {'BYTES':>7}" + ("  RECORD" if decode else ""))
    shown = 0
    for seq, payload in report.records:
        if seq < from_seq:
            continue
        if limit is not None and shown >= limit:
            break
        shown += 1
        kind, text = _describe(payload, decode)
        click.echo(f"{seq:>8}  {kind:<8} {len(payload):>7}" + (f"  {text}" if decode else ""))


def _describe(payload: bytes, decode: bool) -> tuple[str, str]:
    """(kind name, the record's fields as ``name=value``) of one store record."""
    try:
        record = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except ValueError as exc:
        return "?", f"undecodable: {exc}"
    if not isinstance(record, list) or not record:
        return "?", f"not a store record: {record!r:.200}"
    name, names = RECORDS.get(record[0], (f"?{record[0]}", []))
    if not decode:
        return name, ""
    parts = [
        f"{field}={_field(field, value)}" for field, value in zip(names, record[1:], strict=False)
    ]
    if len(record) - 1 > len(names):
        parts.append(f"extra={record[1 + len(names) :]!r}")
    return name, " ".join(parts)


def _field(name: str, value: Any) -> str:
    if name == "arguments" and isinstance(value, bytes):
        try:
            args, kwargs = unpack_arguments(value)
        except ValueError:
            return f"<{len(value)} bytes, undecodable>"
        return f"(args={args!r}, kwargs={kwargs!r})"
    if name in _TIME_FIELDS and isinstance(value, int | float):
        return stamp(value)
    if name in _PAIRED_FIELDS and isinstance(value, list):
        return repr(dict(zip(value[::2], value[1::2], strict=False)))
    if isinstance(value, bytes):
        return value.hex()
    return repr(value)
