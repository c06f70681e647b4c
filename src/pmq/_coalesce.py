"""Coalescing the queued calls that coroutines of one event loop make at the same time.

Owns: turning the ``aexecute`` calls that the tasks of one loop make in one loop iteration into
one ``Store.enqueue`` (one lock, one journal frame) and one wait for durability, then handing
each caller its own outcome. Must not: validate or encode calls (the cage does that before a
call gets here), or decide anything about queues.

Why: a thousand tasks that each enqueue one call pay the store's per-call costs a thousand
times (its lock, a journal append, a future resolved by the journal's flusher, a dispatcher
wake-up); coalesced, they pay them once per loop iteration, which is what lets asyncio
producers reach several times the rate of one-call-at-a-time durable stores.

Invariants:
- A caller's future completes only after its call is durable (the batch's ``sync_async``), or
  with the exception that kept it from being stored: either its call was stored, or it gets an
  exception and nothing of it was stored.
- Outcomes are per call: when the batch as a whole is refused for ``QueueFull``, each call is
  tried alone, in order, so only the calls that do not fit get ``QueueFull`` (the same outcomes
  as if each had been enqueued by itself).
- A caller that is cancelled while it waits does not disturb the others; its call may still have
  been stored (as with any cancelled ``await`` of an ``aexecute``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from pmq._calls import NewCallFields
from pmq._loops import running_loop
from pmq.errors import QueueFull
from pmq.store import Store

__all__ = ["Coalescer"]


class Coalescer:
    """Batches of calls per event loop, each flushed on the loop's next iteration.

    Args:
        store: where calls are stored.
        limit: ``queue -> (max calls, max bytes)`` for ``Store.enqueue``.
        stored: called once after each batch is durable (the cage wakes its dispatcher).
    """

    def __init__(self, store: Store, limit: Callable[[str], tuple[int, int]],
                 stored: Callable[[], None]) -> None:
        self._store = store
        self._limit = limit
        self._stored = stored
        # loop -> (calls, futures) gathered since the flush scheduled on that loop
        self._open: dict[asyncio.AbstractEventLoop,
                         tuple[list[NewCallFields], list[asyncio.Future[str]]]] = {}

    def submit(self, call: NewCallFields) -> asyncio.Future[str]:
        """A future of the call's id, completed once the call is durable."""
        loop = running_loop()
        if loop is None:
            raise RuntimeError("cage.aexecute is for coroutines running in an event loop; "
                               "from plain code use cage.execute")
        batch = self._open.get(loop)
        if batch is None:
            batch = self._open[loop] = ([], [])
            loop.call_soon(self._flush, loop)
        future: asyncio.Future[str] = loop.create_future()
        batch[0].append(call)
        batch[1].append(future)
        return future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        calls, futures = self._open.pop(loop)
        try:
            ids, seq = self._store.enqueue(calls, self._limit)
        except QueueFull:
            self._flush_one_by_one(loop, calls, futures)
            return
        except BaseException as exc:  # nothing was stored: every caller gets the reason
            _fail(futures, exc)
            return
        self._when_durable(seq, ids, futures)

    def _flush_one_by_one(self, loop: asyncio.AbstractEventLoop, calls: list[NewCallFields],
                          futures: list[asyncio.Future[str]]) -> None:
        last = 0
        ids: list[str] = []
        stored: list[asyncio.Future[str]] = []
        for call, future in zip(calls, futures, strict=True):
            try:
                (call_id,), seq = self._store.enqueue([call], self._limit)
            except BaseException as exc:  # this call was not stored
                _fail([future], exc)
                continue
            last = max(last, seq)
            ids.append(call_id)
            stored.append(future)
        if stored:
            self._when_durable(last, ids, stored)

    def _when_durable(self, seq: int, ids: Sequence[str],
                      futures: list[asyncio.Future[str]]) -> None:
        if not seq:  # every call was a duplicate of one already stored
            _succeed(futures, ids)
            return
        durable = self._store.journal.sync_async(seq)

        def done(synced: asyncio.Future[Any]) -> None:
            exc = asyncio.CancelledError() if synced.cancelled() else synced.exception()
            if exc is not None:
                _fail(futures, exc)
                return
            _succeed(futures, ids)
            self._stored()

        durable.add_done_callback(done)


def _succeed(futures: list[asyncio.Future[str]], ids: Sequence[str]) -> None:
    for future, call_id in zip(futures, ids, strict=True):
        if not future.done():  # a cancelled caller
            future.set_result(call_id)


def _fail(futures: list[asyncio.Future[str]], exc: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)
