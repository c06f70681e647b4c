"""What the commands of ``pmq`` share: opening a data directory, and turning numbers into text.

Why a module of its own: ``pmq.cli`` (the root group and ``pmq run``), ``_cli_status``,
``_cli_dead`` and ``_cli_journal`` all need these, and each of those modules stays small enough
to read in one go (STYLE.md: modules under ~700 lines) only if the shared parts live apart.

Owns: finding the data directory or journal directory a command was given, opening a stopped
cage's store (with the one-line errors for a directory in use or damaged), naming the process
that holds a data directory, the exit codes, and the formatting of tables, ages, times and sizes.
Must not: define commands, or decide anything about queues, calls or the journal format.

Invariants: every error here is a ``click.ClickException`` (one line, exit code 1); a data
directory is opened only through ``Store``, which takes its lock.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Collection, Iterator, Sequence

import click

from pmq.errors import JournalCorruption, JournalLocked
from pmq.store import Store

__all__ = [
    "EXIT_ERROR",
    "EXIT_USAGE",
    "JOURNAL_DIRNAME",
    "UNNAMED",
    "age",
    "data_dir_of",
    "in_use",
    "journal_dir_of",
    "json_default",
    "lock_holder",
    "opened_store",
    "plural",
    "problem",
    "size",
    "stamp",
    "table",
    "when",
]

EXIT_ERROR = 1
EXIT_USAGE = 2
JOURNAL_DIRNAME = "journal"
#: The name a data directory is opened under when the cage's own name is neither given nor
#: needed: it only shapes the ids of calls this cage made itself, and there are none to show.
UNNAMED = "unnamed"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


# ---- opening a data directory ----------------------------------------------------------------


def data_dir_of(path: str) -> str:
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


def journal_dir_of(path: str) -> str:
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
def opened_store(data_dir: str, name: str = UNNAMED) -> Iterator[Store]:
    """The store of a stopped cage's data directory, closed (with a checkpoint) afterwards."""
    try:
        store = Store(data_dir, name)
    except JournalLocked:
        raise click.ClickException(in_use(data_dir)) from None
    except JournalCorruption as exc:
        raise click.ClickException(
            f"data directory {data_dir} is damaged: {problem(exc)} (pmq journal verify tells more)"
        ) from None
    try:
        yield store
    finally:
        store.close()


def in_use(data_dir: str) -> str:
    """The message for a data directory that a running cage holds."""
    holder = lock_holder(os.path.join(data_dir, JOURNAL_DIRNAME, "LOCK"))
    by = f"a running cage (pid {holder})" if holder is not None else "a running cage"
    return f"data directory {data_dir} is in use by {by}; stop it first"


def lock_holder(lock_path: str) -> int | None:
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


def problem(exc: JournalCorruption) -> str:
    """``FILE at offset N: what is wrong``, from a JournalCorruption."""
    message = str(exc).removesuffix(f" ({exc.path} at offset {exc.offset})")
    return f"{exc.path} at offset {exc.offset}: {message}"


# ---- formatting ------------------------------------------------------------------------------


def table(
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


def age(seconds: float | None) -> str:
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


def stamp(timestamp: float) -> str:
    """Local time to the millisecond: ``2025-11-28 16:20:01.250``."""
    milliseconds = int(timestamp % 1 * 1000)
    return f"{time.strftime(TIME_FORMAT, time.localtime(timestamp))}.{milliseconds:03d}"


def when(timestamp: float, now: float) -> str:
    """Local time and how long ago: ``2025-11-28 16:20:01 (3m05s ago)``."""
    text = time.strftime(TIME_FORMAT, time.localtime(timestamp))
    ago = now - timestamp
    return f"{text} ({age(ago)} ago)" if ago >= 0 else f"{text} (in {age(-ago)})"


def size(count: float) -> str:
    """``512 B``, ``12.3 KiB``, ``64.0 MiB``, ``2.5 GiB``."""
    if count < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB"):
        count /= 1024
        if count < 1024:
            return f"{count:.1f} {unit}"
    return f"{count / 1024:.1f} GiB"


def plural(count: int, noun: str) -> str:
    """``1 segment``, ``3 segments``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def json_default(value: object) -> object:
    """JSON for what msgpack arguments may hold beyond JSON: bytes as ``{"hex": ...}``."""
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
