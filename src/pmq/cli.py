"""The ``pmq`` command: run a cage from a config file, and look at a cage and its data directory.

Owns: the root command group (click), ``pmq run`` (a cage as a service: the process's signals
while it serves, and its exit codes), and ``pmq demo`` / ``pmq bench``, which hand over to
``pmq._demo`` and ``pmq._bench``. The other commands live in their own private modules and are
added here: ``pmq status`` (``_cli_status``), ``pmq dead`` (``_cli_dead``), ``pmq journal``
(``_cli_journal``); what they share is in ``_cli_common``. Must not: decide anything about
queues, calls or the journal format; whatever the commands show comes from ``Store``, ``Cage``,
``_format`` or ``_checkpoint`` (docs/cli.md lists the commands). It is the top layer: it may
import any module of pmq, and none imports it.

Invariants:
- Exit codes: 0 done (or ``journal verify`` found the journal clean); 1 an error of pmq or of the
  system, or a corrupt journal, told in one line on stderr, never a traceback; 2 a bad command
  line (click's usage message) or something this installation cannot do; 130 a second Ctrl-C.
- Inspection commands open a data directory only through ``Store``, which takes its lock, so
  they never read a journal that a running cage is writing; ``journal verify`` and ``dump`` only
  read files, through ``_format``, and take no lock; ``status --connect`` asks a running cage
  over the wire protocol and changes nothing there.
- ``pmq run`` stops a cage in order (``Cage.stop``: running handlers finish, a checkpoint is
  written, the journal is closed) on SIGTERM or Ctrl-C; a second Ctrl-C leaves at once, which
  loses nothing stored (every stored call is already on disk).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import click

import pmq
from pmq._cli_common import EXIT_USAGE, in_use
from pmq._cli_dead import dead
from pmq._cli_journal import journal
from pmq._cli_status import status
from pmq.errors import JournalLocked, PmqError

__all__ = ["cli", "main"]

log = logging.getLogger("pmq.cli")

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a process stopped by Ctrl-C
HEALTH_POLL_SECONDS = 1.0
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


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

    A process running pmq is a cage. `pmq run` serves one from a config file; `pmq status
    --connect` asks a running one; the other commands look at the data directory of a stopped
    cage. Exit codes: 0 done, 1 error (or a corrupt journal), 2 bad command line.
    """


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``pmq`` command (the console script and ``python -m pmq``).

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` when None.
    """
    cli.main(args=list(argv) if argv is not None else None, prog_name="pmq")


for _command in (status, dead, journal):
    cli.add_command(_command)


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
        raise click.ClickException(in_use(cage.data_dir)) from None
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
