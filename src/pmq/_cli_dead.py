"""``pmq dead list | show | replay | purge``: the dead letters of a stopped cage.

Why a module of its own: the four commands share the way a data directory is opened under its
cage's name and the way one dead letter is found, and nothing else in ``pmq`` needs either;
apart, they keep ``pmq.cli`` small.

Owns: the ``dead`` group, its output (tables, JSON, the confirmation before a purge) and turning
the store's documented errors into one line. Must not: read the store's private state (it asks
``Store.dead_letters``, ``dead_letter_call``, ``recorded_name``, ``revive`` and ``purge``), or
change anything but the one dead letter a command names.

Invariants: a command finds its dead letter before it changes anything, so an unknown or
ambiguous id changes nothing (one line, exit 1); ``purge`` asks first unless ``--yes``; the
directory is opened only through ``Store`` (its lock: never while a cage runs on it).

Interim: the cage's name is read off the dead letters (``Store.recorded_name``) until the data
directory records it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import click

from pmq._calls import DeadLetter
from pmq._cli_common import UNNAMED, data_dir_of, json_default, opened_store, table, when
from pmq._codec import unpack_arguments
from pmq.store import Store

__all__ = ["dead"]


@click.group()
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
    with _dead_store(data_dir_of(data_dir), name) as store:
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
            when(letter.at, now),
            str(letter.attempts),
        )
        for letter in letters
    ]
    click.echo(table(["ID", "QUEUE", "METHOD", "REASON", "WHEN", "ATTEMPTS"], rows, right={5}))


class _NamedLetter(NamedTuple):
    """The dead letter a command names: DATA_DIR CALL_ID [--source CAGE] [--name NAME].

    Why one class: ``show``, ``replay`` and ``purge`` must name their letter with the same
    arguments and find it the same way, before they change anything (the module's invariant).
    """

    data_dir: str
    call_id: str
    source: str | None
    name: str | None

    @staticmethod
    def command(command_name: str) -> Callable[[Callable[..., None]], click.Command]:
        """A ``dead`` command whose action takes a ``_NamedLetter``, then its own options."""

        def decorate(action: Callable[..., None]) -> click.Command:
            # wraps() carries the action's own options (__click_params__) and its help text
            @functools.wraps(action)
            def named(
                data_dir: str, call_id: str, source: str | None, name: str | None, **more: Any
            ) -> None:
                action(_NamedLetter(data_dir, call_id, source, name), **more)

            # applied innermost first, so --help lists DATA_DIR CALL_ID --source --name, then
            # the action's own options, as when each command spelled them out
            for shared in (
                _name_option,
                _source_option,
                click.argument("call_id"),
                _data_dir_argument,
            ):
                named = shared(named)
            return dead.command(command_name)(named)

        return decorate

    @contextlib.contextmanager
    def found(self) -> Iterator[tuple[Store, DeadLetter]]:
        """The open store and the letter in it, found first: an id that names no letter, or
        several, raises ``ClickException`` before the command can change anything."""
        with _dead_store(data_dir_of(self.data_dir), self.name) as store:
            yield store, _find_letter(store.dead_letters(), self.call_id, self.source)


@_NamedLetter.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dead_show(named: _NamedLetter, as_json: bool) -> None:
    """Everything about the dead letter CALL_ID: reason, detail, arguments."""
    with named.found() as (store, letter):
        record = _operate(store.dead_letter_call, letter.call_id, letter.source)
    user_id, arguments = record["user_id"], record["arguments"]
    deadline, created = record["deadline"], record["created"]
    try:
        args, kwargs = unpack_arguments(arguments)
        decoded: dict[str, Any] = {"args": args, "kwargs": kwargs}
    except ValueError as exc:
        decoded = {"undecodable": str(exc)}
    if as_json:
        more = {"user_id": user_id, "created": created, "deadline": deadline}
        shown = {**letter._asdict(), **more, "argument_bytes": len(arguments), "arguments": decoded}
        click.echo(json.dumps(shown, indent=2, default=json_default))
        return
    now = time.time()
    lines = [("id", letter.call_id), ("user id", "-" if user_id is None else user_id),
             ("source", letter.source), ("queue", letter.queue),
             ("call", f"{letter.module}.{letter.method}"), ("reason", letter.reason),
             ("when", when(letter.at, now)), ("attempts", str(letter.attempts)),
             ("created", when(created, now)),
             ("deadline", "-" if deadline is None else when(deadline, now)),
             ("arguments", f"{len(arguments)} bytes")]  # fmt: skip
    if "undecodable" in decoded:
        lines.append(("", f"undecodable: {decoded['undecodable']}"))
    else:
        lines += [("  args", repr(args)), ("  kwargs", repr(kwargs))]
    click.echo("\n".join(f"{key:<10} {value}".rstrip() for key, value in lines))
    click.echo("detail")
    click.echo("\n".join(f"  {line}" for line in (letter.detail or "-").splitlines()))


@_NamedLetter.command("replay")
def dead_replay(named: _NamedLetter) -> None:
    """Send the dead letter CALL_ID back to its queue, with its attempts reset.

    It runs (or is sent to its peer) when the cage starts again.
    """
    with named.found() as (store, letter):
        _operate(store.revive, named.call_id, named.source)
    click.echo(
        f"replayed {letter.call_id} ({letter.module}.{letter.method}): back in "
        f"{letter.queue}, it runs when the cage starts"
    )


@_NamedLetter.command("purge")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def dead_purge(named: _NamedLetter, yes: bool) -> None:
    """Delete the dead letter CALL_ID for good (asks first, unless --yes)."""
    with named.found() as (store, letter):
        if not yes:
            click.confirm(
                f"Delete dead letter {letter.call_id} ({letter.module}."
                f"{letter.method}, {letter.reason}) for good?",
                abort=True,
            )
        _operate(store.purge, named.call_id, named.source)
    click.echo(f"purged {letter.call_id}")


@contextlib.contextmanager
def _dead_store(data_dir: str, name: str | None) -> Iterator[Store]:
    """The store of `data_dir`, opened under the cage's name so that the ids of the calls it
    made itself come out as they were given. Without --name, the name is the source of such a
    call among the dead letters (if there is none, no id depends on the name).
    """
    if name is not None:
        with opened_store(data_dir, name) as store:
            yield store
        return
    with opened_store(data_dir) as store:
        own = store.recorded_name()
        if own is None or own == UNNAMED:
            yield store
            return
    with opened_store(data_dir, own) as store:
        yield store


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


def _operate(operation: Callable[[str, str | None], Any], call_id: str, source: str | None) -> Any:
    """``store.revive``, ``purge`` or ``dead_letter_call``, their documented errors as one line."""
    try:
        return operation(call_id, source)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
