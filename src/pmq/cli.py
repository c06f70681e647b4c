"""The ``pmq`` command: run a cage from a config file, and look at a cage's data directory.

Owns: parsing the command line (click), turning what the store, the cage and ``_format`` return
into tables, JSON and lines people can read, the process's signals while ``pmq run`` serves, and
exit codes. Must not: decide anything about queues, calls or the journal format; whatever it
shows comes from ``Store``, ``Cage``, ``_format`` or ``_checkpoint`` (docs/cli.md lists the
commands).

Invariants:
- Exit codes: 0 done (or ``journal verify`` found the journal clean); 1 an error of pmq or of the
  system, or a corrupt journal, told in one line on stderr, never a traceback; 2 a bad command
  line (click's usage message) or something this installation cannot do; 130 a second Ctrl-C.
- Inspection commands open a data directory only through ``Store``, which takes its lock, so
  they never read a journal that a running cage is writing; ``journal verify`` and ``dump`` only
  read files, through ``_format``, and take no lock.
- ``pmq run`` stops a cage in order (``Cage.stop``: running handlers finish, a checkpoint is
  written, the journal is closed) on SIGTERM or Ctrl-C; a second Ctrl-C leaves at once, which
  loses nothing stored (every stored call is already on disk).

Interim, until the store answers these questions itself (each place says what it waits for):
the direction of a dead letter and the cage's own name are read off the dead letters
(``_outbound``, ``_dead_store``); the oldest call of a queue is the head that ``take`` hands out
and ``give_back`` returns (``_oldest_created``); a dead letter's arguments come from the store's
private ``_payloads`` (``_dead_record``); the layout of store records is spelt out in
``RECORDS`` for ``journal dump --decode``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from types import FrameType
from typing import Any

import click
import msgpack

import pmq
from pmq._calls import K_ATTEMPT, K_CALL, K_DEAD, K_DONE, K_FAIL, K_PURGE, K_REVIVE, DeadLetter
from pmq._checkpoint import FILENAME as CHECKPOINT_FILENAME
from pmq._checkpoint import read_checkpoint
from pmq._codec import unpack_arguments
from pmq._format import SEGMENT_HEADER_BYTES, read_journal
from pmq._links import K_LINK
from pmq.cage import LOOPBACK_QUEUE
from pmq.errors import JournalCorruption, JournalLocked, PmqError
from pmq.store import Store

__all__ = ["cli", "main"]

log = logging.getLogger("pmq.cli")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a process stopped by Ctrl-C
HEALTH_POLL_SECONDS = 1.0
JOURNAL_DIRNAME = "journal"
#: The name a data directory is opened under when the cage's own name is neither given nor
#: needed: it only shapes the ids of calls this cage made itself, and there are none to show.
UNNAMED = "unnamed"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

#: Each store record kind: its name, and its items after the kind (pmq/_calls.py, _links.py).
#: Interim: until _calls.py (which owns the layout) names the fields itself.
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


class _Cli(click.Group):
    """The root group: an error of pmq or of the system becomes one line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise  # click's main ends quietly when the reader of our output went away
        except (PmqError, OSError) as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(pmq.__version__, "-V", "--version", prog_name="pmq")
def cli() -> None:
    """pmq: durable peer-to-peer queued calls between Python processes.

    A process running pmq is a cage. `pmq run` serves one from a config file; the other
    commands look at the data directory of a stopped cage. Exit codes: 0 done, 1 error (or a
    corrupt journal), 2 bad command line.
    """


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``pmq`` command (the console script and ``python -m pmq``).

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` when None.
    """
    cli.main(args=list(argv) if argv is not None else None, prog_name="pmq")


# ---- pmq run ---------------------------------------------------------------------------------


@cli.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="info",
    show_default=True,
    help="Log messages from this level on (stderr).",
)
def run(config: str, log_level: str) -> None:
    """Run a cage as a service, configured by the TOML file CONFIG.

    CONFIG holds pmq.Cage's keywords; its [expose] table maps module names to import paths
    ("package.module" or "package.module:attribute"), imported as Python would (PYTHONPATH,
    installed packages). SIGTERM or Ctrl-C stops the cage in order (running handlers finish,
    a checkpoint is written) and exits 0; a second Ctrl-C exits at once with code 130.
    """
    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(stream=sys.stderr, level=log_level.upper(), format=log_format)
    try:
        cage = pmq.Cage.from_config(config)
    except ImportError as exc:
        raise click.ClickException(f"{config}: cannot import a module to expose: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    stopping = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Only flags here: the main thread may be inside a write to stdout, and a handler that
        # wrote to the same stream would fail with a reentrant call.
        if stopping.is_set() and signum == signal.SIGINT:
            _leave_at_once()
        received.append(signum)
        stopping.set()

    previous = {
        signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        _serve(cage, stopping, received)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _serve(cage: pmq.Cage, stopping: threading.Event, received: list[int]) -> None:
    """Start `cage`, wait for a signal (or for the cage to fail), stop it."""
    try:
        cage.start()
    except JournalLocked:
        raise click.ClickException(_in_use(cage.data_dir)) from None
    address = cage.address
    where = f"listening on {_address(address)}" if address is not None else "running (no listen)"
    click.echo(f"pmq: cage {cage.name!r} {where}, data directory {os.path.abspath(cage.data_dir)}")
    failure: RuntimeError | None = None
    while not stopping.wait(HEALTH_POLL_SECONDS):
        try:
            cage.stats()  # raises once the cage has stopped running calls
        except RuntimeError as exc:
            failure = exc
            break
    stopping.set()  # from here on, Ctrl-C means "exit at once"
    if failure is not None:
        log.error("cage %s stopped running calls: %s; stopping it", cage.name, failure)
    if received:
        click.echo(
            f"pmq: stopping cage {cage.name!r} ({signal.Signals(received[0]).name}): "
            "running handlers finish first; Ctrl-C again to exit at once"
        )
    cage.stop()
    if failure is not None:
        raise click.ClickException(str(failure))
    click.echo(f"pmq: cage {cage.name!r} stopped")


def _leave_at_once() -> None:
    # os.write, not click.echo: this runs in a signal handler (see on_signal).
    os.write(2, b"pmq: interrupted again: exiting at once (stored calls are safe on disk)\n")
    os._exit(EXIT_INTERRUPTED)  # at once: no handler, thread or atexit hook may hold us up


def _address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- opening a data directory ----------------------------------------------------------------


def _data_dir(path: str) -> str:
    """`path` as an absolute data directory, after checking that it is one."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, JOURNAL_DIRNAME)):
        return path
    if os.path.isfile(os.path.join(path, "LOCK")):
        raise click.ClickException(
            f"{path} is a journal directory; give the cage's data "
            f"directory, {os.path.dirname(path)}"
        )
    raise click.ClickException(
        f"{path} is not a pmq data directory (it has no {JOURNAL_DIRNAME}/ directory)"
    )


def _journal_dir(path: str) -> str:
    """The journal directory of `path`: a data directory, or a journal directory itself."""
    path = os.path.abspath(path)
    inner = os.path.join(path, JOURNAL_DIRNAME)
    if os.path.isdir(inner):
        return inner
    if os.path.isfile(os.path.join(path, "LOCK")) or any(
        name.endswith(".seg") for name in os.listdir(path)
    ):
        return path
    raise click.ClickException(
        f"{path} holds no pmq journal (neither a data directory with "
        f"{JOURNAL_DIRNAME}/ nor a journal directory)"
    )


@contextlib.contextmanager
def _opened_store(data_dir: str, name: str = UNNAMED) -> Iterator[Store]:
    """The store of a stopped cage's data directory, closed (with a checkpoint) afterwards."""
    try:
        store = Store(data_dir, name)
    except JournalLocked:
        raise click.ClickException(_in_use(data_dir)) from None
    except JournalCorruption as exc:
        raise click.ClickException(
            f"data directory {data_dir} is damaged: {_problem(exc)} (pmq journal verify tells more)"
        ) from None
    try:
        yield store
    finally:
        store.close()


def _in_use(data_dir: str) -> str:
    holder = _lock_holder(os.path.join(data_dir, JOURNAL_DIRNAME, "LOCK"))
    by = f"a running cage (pid {holder})" if holder is not None else "a running cage"
    return f"data directory {data_dir} is in use by {by}; stop it first"


def _lock_holder(lock_path: str) -> int | None:
    """The pid holding the flock on `lock_path`, when the system says (Linux: /proc/locks)."""
    try:
        st = os.stat(lock_path)
        with open("/proc/locks", encoding="ascii") as file:
            lines = file.read().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2147708 0 EOF"; waiters have a "->" field
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
            return int(fields[4]) if fields[4].isdigit() else None
    return None


# ---- pmq status ------------------------------------------------------------------------------


@cli.command()
@click.argument("data_dir", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--connect", metavar="HOST:PORT", help="Ask a running cage (not supported yet).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(data_dir: str | None, connect: str | None, as_json: bool) -> None:
    """Queues, dead letters and journal of a stopped cage.

    DATA_DIR is the cage's data directory.

    Per queue: calls pending, in flight (0 when the cage is stopped), dead letters, and the age
    of the call at the head of the queue.
    """
    if connect is not None:
        if data_dir is not None:
            raise click.UsageError("give DATA_DIR or --connect, not both")
        click.echo(
            f"Error: not supported yet: pmq status --connect {connect} needs a status "
            "request between cages, which the wire protocol does not have; run `pmq "
            "status DATA_DIR` on the cage's host, with the cage stopped",
            err=True,
        )
        sys.exit(EXIT_USAGE)
    if data_dir is None:
        raise click.UsageError("missing DATA_DIR (or --connect HOST:PORT)")
    directory = _data_dir(data_dir)
    now = time.time()
    with _opened_store(directory) as store:
        report = _status_report(store, now)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"data directory  {directory} (stopped)\n")
    rows = [
        (
            q["queue"],
            q["direction"],
            *map(str, (q["pending"], q["in_flight"], q["dead"])),
            _age(q["oldest_age_seconds"]),
        )
        for q in report["queues"]
    ]
    headers = ["QUEUE", "DIRECTION", "PENDING", "IN FLIGHT", "DEAD", "OLDEST"]
    click.echo(_table(headers, rows, right={2, 3, 4, 5}) if rows else "no queues")
    journal, checkpoint = report["journal"], report["checkpoint"]
    click.echo(f"\njournal         {journal['directory']}")
    click.echo(
        f"                {_plural(journal['segments'], 'segment')}, "
        f"{_size(journal['bytes'])} on disk, next seq {journal['next_seq']}, "
        f"floor {journal['floor']}"
    )
    if checkpoint is None:
        click.echo("checkpoint      none yet: the next start reads the whole journal")
    else:
        click.echo(
            f"checkpoint      covers seq {checkpoint['covered']} "
            f"({checkpoint['records_after']} records after it), written "
            f"{_when(checkpoint['written'], now)}"
        )


def _status_report(store: Store, now: float) -> dict[str, Any]:
    """What `pmq status` shows, as plain data (the --json output)."""
    queues: dict[tuple[str, bool], dict[str, int]] = store.stats()["queues"]
    dead = Counter((letter.queue, _outbound(letter)) for letter in store.dead_letters())
    order = sorted({*queues, *dead}, key=lambda q: (q[1], q[0] != LOOPBACK_QUEUE, q[0]))
    rows = []
    for name, outbound in order:
        counts = queues.get((name, outbound), {"waiting": 0, "taken": 0})
        oldest = _oldest_created(store, name, outbound)
        peer = None if name == LOOPBACK_QUEUE else name.removesuffix("_queue")
        rows.append(
            {
                "queue": name,
                "direction": "outbound" if outbound else "loopback" if peer is None else "inbound",
                "peer": peer,
                "pending": counts["waiting"] + counts["taken"],
                "in_flight": counts["taken"],
                "dead": dead[(name, outbound)],
                "oldest_created": oldest,
                "oldest_age_seconds": None if oldest is None else max(0.0, now - oldest),
            }
        )
    journal = store.journal
    segments = journal.segments()
    checkpoint = read_checkpoint(store.directory)  # the cage's own: ours is written at close
    checkpoint_path = os.path.join(store.directory, CHECKPOINT_FILENAME)
    return {
        "data_dir": store.directory,
        "running": False,
        "queues": rows,
        "dead": sum(dead.values()),
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


def _outbound(letter: DeadLetter) -> bool:
    """Whether a dead letter was on its way to a peer (docs/cage.md: a cage keeps
    ``<source>_queue`` for calls from ``<source>``, ``<peer>_queue`` for calls to a peer).

    Interim: until ``DeadLetter`` has an ``outbound`` field.
    """
    return letter.queue != LOOPBACK_QUEUE and letter.queue != f"{letter.source}_queue"


def _oldest_created(store: Store, queue: str, outbound: bool) -> float | None:
    """When the call at the head of `queue` was made (None: the queue is empty).

    Interim: until the store reports the oldest pending call of each queue.
    """
    calls = store.take(queue, 1, outbound)
    if not calls:
        return None
    store.give_back(calls)  # a stopped cage's store: nothing runs, nothing is recorded
    return float(calls[0].created)


# ---- pmq dead --------------------------------------------------------------------------------


@cli.group()
def dead() -> None:
    """Dead letters of a stopped cage: list, show, replay, purge."""


_data_dir_argument = click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
_name_option = click.option(
    "--name",
    help="The cage's name, which its own call ids start with (default: found in the dead letters).",
)
_source_option = click.option(
    "--source",
    metavar="CAGE",
    help="The cage that made the call, when cages used the same id (id=...).",
)


@dead.command("list")
@_data_dir_argument
@_name_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def dead_list(data_dir: str, name: str | None, as_json: bool) -> None:
    """List the dead letters in DATA_DIR, oldest first."""
    with _dead_store(_data_dir(data_dir), name) as store:
        letters = store.dead_letters()
    if as_json:
        click.echo(json.dumps([letter._asdict() for letter in letters], indent=2))
        return
    if not letters:
        click.echo("no dead letters")
        return
    now = time.time()
    rows = [
        (
            letter.call_id,
            letter.queue,
            f"{letter.module}.{letter.method}",
            letter.reason,
            _when(letter.at, now),
            str(letter.attempts),
        )
        for letter in letters
    ]
    click.echo(_table(["ID", "QUEUE", "METHOD", "REASON", "WHEN", "ATTEMPTS"], rows, right={5}))


@dead.command("show")
@_data_dir_argument
@click.argument("call_id")
@_source_option
@_name_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dead_show(
    data_dir: str, call_id: str, source: str | None, name: str | None, as_json: bool
) -> None:
    """Everything about the dead letter CALL_ID: reason, detail, arguments."""
    with _dead_store(_data_dir(data_dir), name) as store:
        letter = _find_letter(store.dead_letters(), call_id, source)
        fields = _dead_record(store, letter)
    user_id, arguments, deadline, created = fields[4], fields[7], fields[8], fields[9]
    try:
        args, kwargs = unpack_arguments(arguments)
        decoded: dict[str, Any] = {"args": args, "kwargs": kwargs}
    except ValueError as exc:
        decoded = {"undecodable": str(exc)}
    if as_json:
        more = {"user_id": user_id, "created": created, "deadline": deadline}
        shown = {**letter._asdict(), **more, "argument_bytes": len(arguments), "arguments": decoded}
        click.echo(json.dumps(shown, indent=2, default=_json_default))
        return
    now = time.time()
    lines = [("id", letter.call_id), ("user id", "-" if user_id is None else user_id),
             ("source", letter.source), ("queue", letter.queue),
             ("call", f"{letter.module}.{letter.method}"), ("reason", letter.reason),
             ("when", _when(letter.at, now)), ("attempts", str(letter.attempts)),
             ("created", _when(created, now)),
             ("deadline", "-" if deadline is None else _when(deadline, now)),
             ("arguments", f"{len(arguments)} bytes")]  # fmt: skip
    if "undecodable" in decoded:
        lines.append(("", f"undecodable: {decoded['undecodable']}"))
    else:
        lines += [("  args", repr(args)), ("  kwargs", repr(kwargs))]
    click.echo("\n".join(f"{key:<10} {value}".rstrip() for key, value in lines))
    click.echo("detail")
    click.echo("\n".join(f"  {line}" for line in (letter.detail or "-").splitlines()))


@dead.command("replay")
@_data_dir_argument
@click.argument("call_id")
@_source_option
@_name_option
def dead_replay(data_dir: str, call_id: str, source: str | None, name: str | None) -> None:
    """Send the dead letter CALL_ID back to its queue, with its attempts reset.

    It runs (or is sent to its peer) when the cage starts again.
    """
    with _dead_store(_data_dir(data_dir), name) as store:
        letter = _find_letter(store.dead_letters(), call_id, source)
        _dead_letter_op(store.revive, call_id, source)
    click.echo(
        f"replayed {letter.call_id} ({letter.module}.{letter.method}): back in "
        f"{letter.queue}, it runs when the cage starts"
    )


@dead.command("purge")
@_data_dir_argument
@click.argument("call_id")
@_source_option
@_name_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def dead_purge(
    data_dir: str, call_id: str, source: str | None, name: str | None, yes: bool
) -> None:
    """Delete the dead letter CALL_ID for good (asks first, unless --yes)."""
    with _dead_store(_data_dir(data_dir), name) as store:
        letter = _find_letter(store.dead_letters(), call_id, source)
        if not yes:
            click.confirm(
                f"Delete dead letter {letter.call_id} ({letter.module}."
                f"{letter.method}, {letter.reason}) for good?",
                abort=True,
            )
        _dead_letter_op(store.purge, call_id, source)
    click.echo(f"purged {letter.call_id}")


@contextlib.contextmanager
def _dead_store(data_dir: str, name: str | None) -> Iterator[Store]:
    """The store of `data_dir`, opened under the cage's name so that the ids of the calls it
    made itself come out as they were given. Without --name, the name is the source of such a
    call among the dead letters (if there is none, no id depends on the name).

    Interim: until the data directory records its cage's name.
    """
    if name is not None:
        with _opened_store(data_dir, name) as store:
            yield store
        return
    with _opened_store(data_dir) as store:
        own = next((letter.source for letter in store.dead_letters() if _own(letter)), None)
        if own is None or own == UNNAMED:
            yield store
            return
    with _opened_store(data_dir, own) as store:
        yield store


def _own(letter: DeadLetter) -> bool:
    """Whether this cage made the call itself (to itself, or to a peer)."""
    return letter.queue == LOOPBACK_QUEUE or _outbound(letter)


def _find_letter(letters: list[DeadLetter], call_id: str, source: str | None) -> DeadLetter:
    found = [
        letter
        for letter in letters
        if letter.call_id == call_id and source in (None, letter.source)
    ]
    if not found:
        raise click.ClickException(f"{call_id!r} is not a dead letter (pmq dead list shows them)")
    if len(found) > 1:
        sources = ", ".join(sorted(letter.source for letter in found))
        raise click.ClickException(
            f"dead letters from {sources} all have the id {call_id!r}: say which with --source"
        )
    return found[0]


def _dead_letter_op(operation: Any, call_id: str, source: str | None) -> None:
    """``store.revive`` or ``store.purge``, their documented errors as one line."""
    try:
        operation(call_id, source)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def _dead_record(store: Store, letter: DeadLetter) -> tuple[Any, ...]:
    """The CALL record of a dead letter (user id, arguments, deadline, created).

    Interim, reading the store's private state: until ``DeadLetter`` carries these fields.
    """
    with store._lock:
        key = store._dead_key(letter.call_id, letter.source)
        return store._payloads([key])[key]


# ---- pmq journal -----------------------------------------------------------------------------


@cli.group()
def journal() -> None:
    """Check or print a journal (with the reader of docs/FORMAT.md)."""


@journal.command("verify")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def journal_verify(path: str) -> None:
    """Read every segment of the journal at PATH (a data directory or a journal directory).

    Exits 0 when a cage would open it without losing anything acknowledged, 1 when it is
    corrupt. It takes no lock: on a running cage's journal it checks a snapshot.
    """
    directory = _journal_dir(path)
    click.echo(f"journal     {directory}")
    holder = _lock_holder(os.path.join(directory, "LOCK"))
    if holder is not None:
        click.echo(f"note        in use by pid {holder}: this checks a snapshot")
    try:
        report = read_journal(directory)
    except JournalCorruption as exc:
        click.echo(f"problem     {_problem(exc)}")
        click.echo(
            "result      CORRUPT: a cage refuses to open this journal; restore it from a "
            "backup (docs/journal.md: on_corruption)"
        )
        sys.exit(EXIT_ERROR)
    on_disk = sum(os.path.getsize(scan.path) for scan in report.segments)
    used = sum(scan.end_offset - SEGMENT_HEADER_BYTES for scan in report.segments)
    click.echo(
        f"segments    {len(report.segments)} ({_size(on_disk)} on disk, {_size(used)} in frames)"
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
    problem = _check_checkpoint(path, directory)
    if problem is not None:
        click.echo(f"problem     {problem}")
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
        return _problem(exc)
    if state is None:
        click.echo("checkpoint  none")
    else:
        click.echo(f"checkpoint  covers seq {state['covered']}")
    return None


def _problem(exc: JournalCorruption) -> str:
    message = str(exc).removesuffix(f" ({exc.path} at offset {exc.offset})")
    return f"{exc.path} at offset {exc.offset}: {message}"


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
    directory = _journal_dir(path)
    try:
        report = read_journal(directory)
    except JournalCorruption as exc:
        raise click.ClickException(
            f"journal is corrupt: {_problem(exc)} (pmq journal verify tells more)"
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
        return _stamp(value)
    if name in _PAIRED_FIELDS and isinstance(value, list):
        return repr(dict(zip(value[::2], value[1::2], strict=False)))
    if isinstance(value, bytes):
        return value.hex()
    return repr(value)


# ---- pmq demo, pmq bench ---------------------------------------------------------------------


def _delegating(command: str, summary: str) -> None:
    """Add ``pmq <command> [ARGS]...``, which hands ARGS to ``pmq._<command>.main``."""

    @cli.command(
        command,
        help=f"{summary}\n\nArguments go to it: `pmq {command} -- --help` lists them.",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def delegate(args: tuple[str, ...]) -> None:
        _delegate(command, args)


_delegating("demo", "Two cages at work, SIGKILLed on the way; then a tally of every call.")
_delegating("bench", "Measure pmq on this machine.")


def _delegate(command: str, args: tuple[str, ...]) -> None:
    """Run ``pmq._<command>.main(argv)``, which may not be part of every installation."""
    try:
        entry = importlib.import_module(f"pmq._{command}").main
    except (ImportError, AttributeError) as exc:
        click.echo(f"pmq {command} is not available in this installation: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    code = entry(list(args))
    sys.exit(code if isinstance(code, int) else 0)


# ---- formatting ------------------------------------------------------------------------------


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()
) -> str:
    """An aligned text table; columns in `right` (numbers) are right-aligned."""
    widths = [
        max([len(header), *(len(row[i]) for row in rows)]) for i, header in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), *map(line, rows)])


def _age(seconds: float | None) -> str:
    """``45s``, ``3m05s``, ``2h07m``, ``3d04h``; ``-`` for no age."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _stamp(timestamp: float) -> str:
    """Local time to the millisecond: ``2025-11-28 16:20:01.250``."""
    milliseconds = int(timestamp % 1 * 1000)
    return f"{time.strftime(TIME_FORMAT, time.localtime(timestamp))}.{milliseconds:03d}"


def _when(timestamp: float, now: float) -> str:
    """Local time and how long ago: ``2025-11-28 16:20:01 (3m05s ago)``."""
    stamp = time.strftime(TIME_FORMAT, time.localtime(timestamp))
    ago = now - timestamp
    return f"{stamp} ({_age(ago)} ago)" if ago >= 0 else f"{stamp} (in {_age(-ago)})"


def _size(count: float) -> str:
    """``512 B``, ``12.3 KiB``, ``64.0 MiB``, ``2.5 GiB``."""
    if count < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB"):
        count /= 1024
        if count < 1024:
            return f"{count:.1f} {unit}"
    return f"{count / 1024:.1f} GiB"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _json_default(value: object) -> object:
    """JSON for what msgpack arguments may hold beyond JSON: bytes as ``{"hex": ...}``."""
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
