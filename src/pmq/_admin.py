"""pmq's own synchronous methods, under the reserved module name ``pmq``: ``pmq.status``.

Why a module of its own: ``pmq status --connect HOST:PORT`` asks a running cage over the wire
protocol, as a client cage that sends one REQUEST, so the answer has to come from the cage's
side of an RPC; this keeps that out of ``cage.py`` (which only routes the reserved name here)
and out of ``dispatch.py`` (which runs user handlers).

Owns: what a cage answers to a synchronous call of module ``pmq`` (``_names.RESERVED_MODULE``)
from any cage that passed the handshake: ``status``, the cage's ``stats()`` with a report per
queue (``Store.queue_report``) and per peer. Must not: run user code, change any state of the
cage, or take part in queued calls (a queued call to ``pmq.x`` is refused at acceptance like any
module the cage does not expose, and no cage can expose ``pmq``: ``_names.check_module_name``).

Invariants:
- The answer is packed like any RPC result (``_codec.pack_arguments([result], {})``), so every
  client that can call a cage can read it: plain dicts with str keys, lists, numbers, str, None.
- Whatever goes wrong becomes the error triple of the RESPONSE (type, message, traceback), never
  an exception into the transport.
- The store's part is read on a worker thread: a big queue's head may have to be read back from
  disk, which must not stall the cage's event loop.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

from pmq._codec import pack_arguments, unpack_arguments
from pmq.errors import PmqError

if TYPE_CHECKING:
    from pmq.cage import Cage

__all__ = ["METHODS", "serve_builtin"]

#: pmq's own methods, as ``pmq.<method>``.
METHODS = ("status",)

Answer = tuple[bool, bytes | None, tuple[str, str, str] | None]


async def serve_builtin(cage: Cage, source: str, method: str, arguments: bytes) -> Answer:
    """Answer the synchronous call ``pmq.<method>(...)`` from cage `source`.

    Args:
        cage: the cage that answers (running).
        source: the calling cage, as the handshake established it.
        method: the method of module ``pmq`` that was called.
        arguments: the packed (args, kwargs); ``status`` takes none.

    Returns:
        ``(True, packed result, None)``, or ``(False, None, (type, message, traceback))``.
    """
    if method not in METHODS:
        known = ", ".join(METHODS)
        reason = f"pmq.{method} is not one of pmq's own methods on cage {cage.name} ({known})"
        return False, None, ("pmq.NotExposed", reason, "")
    try:
        args, kwargs = unpack_arguments(arguments)
    except ValueError as exc:
        return False, None, ("ValueError", f"pmq.{method}: undecodable arguments: {exc}", "")
    if args or kwargs:
        return False, None, ("TypeError", f"pmq.{method}() takes no arguments", "")
    peers = _peers(cage)
    try:
        report = await asyncio.get_running_loop().run_in_executor(None, _store_status, cage)
    except (PmqError, RuntimeError, OSError) as exc:  # a failed cage or journal: say so
        return False, None, (type(exc).__name__, str(exc), "")
    report["peers"] = peers
    return True, pack_arguments([report], {}), None


def _store_status(cage: Cage) -> dict[str, Any]:
    """``cage.stats()`` with its per-queue dict (tuple keys) replaced by a list that says more
    (``Store.queue_report``), plus the cage's name, data directory and clock, the journal's
    files (``journal_files``: directory, segments, bytes on disk, floor) and the transport's
    counters."""
    stats = cage.stats()  # RuntimeError on a cage that stopped running calls
    store = cage.store
    assert store is not None  # stats() checked it
    journal = store.journal
    segments = journal.segments()
    stats["queues"] = store.queue_report()
    stats["journal_files"] = {
        "directory": journal.directory,
        "segments": len(segments),
        "bytes": sum(s.size_bytes for s in segments),
        "floor": journal.floor,
    }
    transport = cage.transport
    if transport is not None:
        stats["transport"] = dict(transport.counters)
    return {
        "cage": cage.name,
        "data_dir": os.path.abspath(cage.data_dir),
        "time": time.time(),
        **stats,
    }


def _peers(cage: Cage) -> dict[str, dict[str, Any]]:
    """Whether each peer's link is connected, and its last error (on the cage's loop)."""
    transport = cage.transport
    if transport is None:
        return {}
    return {
        name: {
            "connected": link.up.is_set(),
            "last_error": None if link.up.is_set() else link.last_error,
        }
        for name, link in transport.links.items()
    }
