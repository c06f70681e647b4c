"""The facade users see: a Cage, its lifecycle, execute/aexecute and transactions.

Owns: configuration, starting and stopping the store, dispatcher and maintenance in order,
turning a call from the proxy into a stored call, waiting for its durability, and the
``pmq.execute`` / ``pmq.aexecute`` proxies that reach the cage running the current handler.
Must not: parse frames, touch journal bytes or run handlers itself.

Invariants:
- ``execute`` and ``aexecute`` return only once the call is durable (per the durability mode).
- A transaction's calls are one journal frame and one fsync; a block that raises stores nothing.
- The blocking ``execute`` refuses to run on the cage's own event-loop thread (it would block
  the loop that has to make its own progress) and says to use ``aexecute``.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import ipaddress
import logging
import operator
import os
import ssl
import threading
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

from pmq import protocol
from pmq._admin import serve_builtin
from pmq._calls import CallStatus, DeadLetter, NewCallFields
from pmq._coalesce import Coalescer
from pmq._codec import pack_call_arguments, unpack_arguments
from pmq._config import QueuePolicy, load_config, parse_address, policies_from
from pmq._loops import running_loop
from pmq._names import RESERVED_MODULE, check_cage_name, check_call_id, check_module_name
from pmq.dispatch import Dispatcher, Registry, current_cage, current_call, serve_request
from pmq.errors import JournalError, JournalFailed, ProtocolError, QueueFull, Timeout
from pmq.proxy import MethodRef, Proxy, Target
from pmq.store import Store
from pmq.transport import Transport

__all__ = ["Cage", "Transaction", "aexecute", "execute"]

log = logging.getLogger("pmq.cage")


MAINTENANCE_SECONDS = 1.0
DRAIN_POLL_SECONDS = 0.005
LOOPBACK_QUEUE = "loopback_queue"
#: The largest arguments a call to another cage may carry: a frame, and the receiver's window,
#: must hold the call with room to spare.
MAX_WIRE_ARGUMENTS = protocol.DEFAULT_WINDOW_BYTES - (1 << 20)


class Cage:
    """A process's pmq endpoint: a name, a data directory and the modules it exposes.

    Args:
        name: the cage's name (``[A-Za-z0-9_-]{1,32}``, not ending in ``_queue``).
        data_dir: where its journal and checkpoint live; one cage per directory.
        listen: "host:port" to accept other cages on (port 0: any free port).
        peers: {cage name: "host:port" or a list of them, tried in order} of the cages this
            one calls.
        secret: shared secret for the handshake between cages (HMAC challenge and response).
        tls_server, tls_client: ``ssl.SSLContext`` for accepting and for connecting; the peer's
            certificate must name exactly the cage it says it is.
        allow_insecure: listen on an address other than loopback without a secret or TLS.
        queues: {queue name: QueuePolicy or mapping}; "default" applies to the rest.
        durability: "always" (fsync before execute returns), "interval" or "never".
        workers: threads running plain (non-async) handlers.
        retention: seconds a user id (``id=``) is remembered against duplicates.
        expose: {module name: object} to expose at once (or call ``expose`` later).
        segment_bytes: journal segment size.

    Raises:
        ValueError, TypeError: a bad argument, named in the message.
    """

    def __init__(self, name: str, data_dir: str | os.PathLike[str], *,
                 listen: str | None = None,
                 peers: Mapping[str, str | list[str]] | None = None,
                 secret: bytes | None = None,
                 queues: Mapping[str, QueuePolicy | Mapping[str, Any]] | None = None,
                 durability: str = "always", workers: int = 16, retention: float = 259_200.0,
                 expose: Mapping[str, object] | None = None,
                 segment_bytes: int = 64 << 20,
                 tls_server: ssl.SSLContext | None = None,
                 tls_client: ssl.SSLContext | None = None,
                 allow_insecure: bool = False) -> None:
        self.name = check_cage_name(name)
        self.data_dir = os.fspath(data_dir)
        self.listen = parse_address(listen, allow_port_zero=True) if listen is not None else None
        self.peers: dict[str, list[tuple[str, int]]] = {}
        for peer, addresses in (peers or {}).items():
            listed = [addresses] if isinstance(addresses, str) else list(addresses)
            if not listed:
                raise ValueError(f"peer {peer!r} has no address")
            self.peers[check_cage_name(peer)] = [parse_address(a) for a in listed]
        if secret is not None and not isinstance(secret, bytes):
            raise TypeError(f"secret must be bytes, not {type(secret).__name__}")
        self.secret = secret
        self.tls_server = tls_server
        self.tls_client = tls_client
        if (self.listen is not None and secret is None and tls_server is None
                and not allow_insecure and not _is_loopback(self.listen[0])):
            raise ValueError(
                f"cage {name!r} would accept calls from anyone on {self.listen[0]}: give it a "
                f"secret= or tls_server=, listen on 127.0.0.1, or pass allow_insecure=True")
        self.policies = policies_from(queues)
        if durability not in ("always", "interval", "never"):
            raise ValueError(f"durability must be 'always', 'interval' or 'never', "
                             f"not {durability!r}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.durability = durability
        self.workers = workers
        self.retention = retention
        self.segment_bytes = segment_bytes
        self.registry = Registry()
        for module, obj in (expose or {}).items():
            self.expose(module, obj)
        self.store: Store | None = None
        self.dispatcher: Dispatcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._serve_task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._own_loop = False
        self._routes: dict[str, tuple[str, bool]] = {}  # target -> (queue, outbound)
        self._max_arguments = self._max_wire_arguments = 0  # set when the journal is open
        self._coalescer: Coalescer | None = None
        self.transport: Transport | None = None
        self.execute: Proxy[Any] = Proxy(self._submit)
        self.aexecute: Proxy[Any] = Proxy(self._asubmit)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str]) -> Cage:
        """A cage configured by a TOML file whose keys are this constructor's keywords.

        ``expose`` there maps module names to import paths (``"pkg.mod"`` or
        ``"pkg.mod:attribute"``), which are imported here.

        Raises:
            ValueError: the file breaks a rule (the message names the file and the key).
            ImportError: a module to expose cannot be imported.
        """
        config = load_config(path)
        paths = config.pop("expose", None) or {}
        config["expose"] = {name: _import(str(target)) for name, target in paths.items()}  # type: ignore[attr-defined]
        return cls(**config)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        state = "running" if self._loop is not None else "stopped"
        return f"<Cage {self.name!r} {state} data_dir={self.data_dir!r}>"

    def expose(self, name: str, obj: object, to: list[str] | None = None) -> None:
        """Make `obj`'s public callables callable as `name.x` by this cage and other cages
        (only the cages named in `to`, when it is given). ``pmq`` is reserved (pmq.status)."""
        self.registry.expose(check_module_name(name), obj, to)

    def policy(self, queue: str) -> QueuePolicy:
        """The policy of `queue`: its own entry in `queues`, else "default", else defaults."""
        return self.policies.get(queue) or self.policies.get("default") or QueuePolicy()

    # ---- lifecycle -----------------------------------------------------------------------

    def _open(self) -> None:
        if self.store is not None:
            raise RuntimeError(f"cage {self.name!r} is already started")
        self.store = Store(self.data_dir, self.name, durability=self.durability,
                           segment_bytes=self.segment_bytes, retention=self.retention)
        self.dispatcher = Dispatcher(self.store, self.registry, self.policy, self,
                                     workers=self.workers)
        self._max_arguments = self.store.journal.max_payload_bytes - 1024
        self._max_wire_arguments = min(self._max_arguments, MAX_WIRE_ARGUMENTS)
        self._coalescer = Coalescer(self.store, self._limit, self._notify)

    def start(self) -> None:
        """Open the data directory and run the cage on a background thread with its own loop.

        Raises:
            JournalLocked: another process (or cage) has the data directory open.
            JournalCorruption: the data directory is damaged.
        """
        self._open()
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve(ready))
            except BaseException as exc:  # reported to start() or logged: never lost silently
                failure.append(exc)
                log.exception("cage %s stopped on an error", self.name)
                ready.set()
            finally:
                _finish(loop)

        self._own_loop = True
        self._thread = threading.Thread(target=main, name=f"pmq-cage-{self.name}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._close_store()
            raise failure[0]

    async def _serve(self, ready: threading.Event | None = None) -> None:
        if ready is not None:
            await self._start_transport()
        self._loop = asyncio.get_running_loop()
        assert self.dispatcher is not None
        self._tasks = [asyncio.create_task(self.dispatcher.run()),
                       asyncio.create_task(self._maintain())]
        if ready is not None:
            ready.set()
        for task in self._tasks:
            task.add_done_callback(self._task_done)
        # Runs until stop() cancels maintenance: the loop stays alive for stop() even when a
        # task has failed.
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _start_transport(self) -> None:
        """Listen and connect to the peers (a busy port raises here, from start())."""
        store = self.store
        assert store is not None and self.dispatcher is not None
        if self.listen is None and not self.peers:
            return
        registry, name = self.registry, self.name
        self.transport = Transport(
            name, store.journal.journal_id, store, listen=self.listen, peers=self.peers,
            secret=self.secret, tls_server=self.tls_server, tls_client=self.tls_client,
            refuse=lambda source, module, method: registry.refusal(source, module, method, name),
            serve=lambda source, module, method, arguments: (
                serve_builtin(self, source, method, arguments) if module == RESERVED_MODULE
                else serve_request(registry, self, source, module, method, arguments)),
            accepted=self.dispatcher.notify)
        await self.transport.start()

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) this cage listens on, with the real port when ``listen`` gave 0."""
        return self.transport.address if self.transport is not None else None

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """Report a failed dispatcher or maintenance task at once, not at stop()."""
        if task.cancelled() or task.exception() is None or self._failure is not None:
            return
        self._failure = task.exception()
        log.error("cage %s stopped running calls: %r; stop it and start it again", self.name,
                  self._failure, exc_info=self._failure)

    async def _maintain(self) -> None:
        """Checkpoint and reclaim space in the background, off the event loop."""
        loop = asyncio.get_running_loop()
        assert self.store is not None
        while True:
            await asyncio.sleep(MAINTENANCE_SECONDS)
            try:
                await loop.run_in_executor(None, self.store.maintain)
            except JournalFailed:
                raise  # the journal refuses all work: the cage has to be restarted
            except (JournalError, OSError) as exc:
                # No checkpoint this time (e.g. the disk is full): nothing is lost, the journal
                # keeps everything; try again at the next tick.
                log.error("cage %s: checkpoint failed, will retry: %s", self.name, exc)

    def stop(self) -> None:
        """Finish running handlers, write a checkpoint and close the data directory."""
        if self._loop is None or self._thread is None:
            return
        if threading.current_thread() is self._thread:
            raise RuntimeError("stop() called from the cage's own event loop; use "
                               "`await cage.astop()` there")
        if self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            future.result()
        self._thread.join()
        self._thread = None
        self._close_store()

    async def astop(self) -> None:
        """Stop a cage started with ``async with`` (or from its own loop)."""
        await self._shutdown()
        if not self._own_loop:
            self._close_store()

    async def _shutdown(self) -> None:
        assert self.dispatcher is not None
        if self.transport is not None:
            await self.transport.stop()
            self.transport = None
        self.dispatcher.stop()
        dispatch_task, *others = self._tasks
        for task in others:
            task.cancel()
        await asyncio.gather(dispatch_task, *others, return_exceptions=True)
        self._loop = None

    def _close_store(self) -> None:
        store, self.store = self.store, None
        self.dispatcher = None
        if store is not None:
            store.close()

    def __enter__(self) -> Cage:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> Cage:
        """Run the cage on the caller's event loop."""
        self._open()
        self._own_loop = False
        try:
            await self._start_transport()
        except BaseException:
            self._close_store()
            raise
        self._serve_task = asyncio.create_task(self._serve())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.astop()

    # ---- making calls --------------------------------------------------------------------

    def _new_call(self, into: list[NewCallFields], spec: MethodRef[Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> None:
        """Validate and encode a queued call and add it to `into`, a list for Store.enqueue.

        Raises:
            TypeError: an argument cannot travel (the message names it).
            ValueError: the arguments are too big, the peer is unknown, the id is invalid.
        """
        route = self._routes.get(spec.target)
        if route is None:
            route = self._route(spec)
        user_id = spec.user_id
        if user_id is not None:
            check_call_id(user_id)
            parent = current_call()
            if parent is not None and current_cage() is self:
                user_id = f"{parent.call_id}:{user_id}"
        arguments = pack_call_arguments(args, kwargs)
        limit = self._max_wire_arguments if route[1] else self._max_arguments
        if len(arguments) > limit:
            raise ValueError(f"the arguments of {spec.module}.{spec.method} take "
                             f"{len(arguments)} bytes, over this cage's limit of {limit} bytes"
                             f"{' for calls to other cages' if route[1] else ''}")
        deadline = time.time() + spec.expires_in if spec.expires_in is not None else None
        # A plain tuple in NewCall's order (NewCallFields): no NamedTuple __new__ (a third of a
        # µs per call, which transactions of thousands of calls notice), and the collector
        # untracks it while the transaction is open.
        into.append((route[0], route[1], spec.module, spec.method, arguments, user_id, deadline,
                     self.name))

    def _route(self, spec: MethodRef[Any]) -> tuple[str, bool]:
        """(queue, outbound) of a queued call to ``spec.target``, remembered per target."""
        if spec.target in ("loopback", self.name):
            route = (LOOPBACK_QUEUE, False)
        elif spec.target in self.peers:
            route = (f"{spec.target}_queue", True)
        else:
            known = ", ".join(sorted(self.peers)) or "none"
            raise ValueError(f"unknown peer {spec.target!r} in execute.on({spec.target}_queue): "
                             f"cage {self.name!r} knows the peers: {known}")
        self._routes[spec.target] = route
        return route

    def _store(self) -> Store:
        if self.store is None:
            raise RuntimeError(f"cage {self.name!r} is not started: call start() first")
        if self._failure is not None:
            raise RuntimeError(f"cage {self.name!r} stopped running calls "
                               f"({self._failure!r}); stop it and start it again")
        return self.store

    def _limit(self, queue: str) -> tuple[int, int]:
        policy = self.policy(queue)
        return policy.max_pending, policy.max_pending_bytes

    def _submit(self, spec: MethodRef[Any], args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
        if self._loop is not None and _running_loop() is self._loop:
            raise RuntimeError(
                f"cage.execute blocks until the call is on disk (or, for a synchronous call, "
                f"answered), which would stall cage {self.name!r}'s own event loop; use "
                f"`await cage.aexecute.on(...)` (or `await pmq.aexecute.on(...)` in a handler) "
                f"there")
        if not spec.queued:
            self._store()  # a stopped cage says so, as for queued calls
            loop = self._loop
            if loop is None:
                raise RuntimeError(f"cage {self.name!r} is not running: call start() first")
            return asyncio.run_coroutine_threadsafe(self._rpc(spec, args, kwargs), loop).result()
        store = self._store()
        calls: list[NewCallFields] = []
        self._new_call(calls, spec, args, kwargs)
        ids, seq = store.enqueue(calls, self._limit)
        if seq:
            store.journal.sync(seq)
            outbound = calls[0][1]
            self._notify(not outbound, outbound)
        return ids[0]

    def _asubmit(self, spec: MethodRef[Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Awaitable[str | None]:
        """The call is validated and submitted now; the awaitable completes once it is durable.

        A plain future, not a coroutine: asyncio producers make calls by the hundred thousand
        per second, and a coroutine frame per call was a tenth of their cost.
        """
        self._store()
        assert self._coalescer is not None
        if not spec.queued:
            coroutine = self._rpc(spec, args, kwargs)
            if _running_loop() is self._loop:
                return coroutine
            return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self._loop))  # type: ignore[arg-type]
        calls: list[NewCallFields] = []
        self._new_call(calls, spec, args, kwargs)
        if spec.wait:
            return self._asubmit_waiting(calls[0])
        return self._coalescer.submit(calls[0])

    async def _rpc(self, spec: MethodRef[Any], args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        """A synchronous call to a peer: its result, or RemoteError, Timeout, TransportError."""
        self._store()
        if spec.target in ("loopback", self.name):
            raise ValueError(f"execute.on({spec.target!r}) is a synchronous call to this cage "
                             f"itself: call the function directly, or queue it with "
                             f"execute.on('loopback_queue')")
        if spec.target not in self.peers or self.transport is None:
            known = ", ".join(sorted(self.peers)) or "none"
            raise ValueError(f"unknown peer {spec.target!r} in execute.on({spec.target!r}): "
                             f"cage {self.name!r} knows the peers: {known}")
        arguments = pack_call_arguments(args, kwargs)
        if len(arguments) > MAX_WIRE_ARGUMENTS:
            raise ValueError(f"the arguments of {spec.module}.{spec.method} take "
                             f"{len(arguments)} bytes, over the limit of {MAX_WIRE_ARGUMENTS} "
                             f"bytes for calls to other cages")
        result = await self.transport.call(spec.target, spec.module, spec.method, arguments,
                                           spec.timeout)
        try:
            return unpack_arguments(result)[0][0]
        except (ValueError, IndexError) as exc:
            raise ProtocolError(f"cage {spec.target!r} answered {spec.module}.{spec.method} "
                                f"with a malformed result: {exc}") from None

    async def _asubmit_waiting(self, call: NewCallFields) -> str | None:
        assert self._coalescer is not None
        while True:
            try:
                return await self._coalescer.submit(call)
            except QueueFull:
                await asyncio.sleep(0.05)  # wait=True: back-pressure reaches the caller as a wait

    def _notify(self, local: bool = True, outbound: bool = True) -> None:
        """Calls were stored: wake the dispatcher if some are this cage's to run (`local`),
        the links if some go to peers (`outbound`); from any thread. Each wake-up from another
        thread is a hop to the event loop, which the other part does not need."""
        if local and self.dispatcher is not None:
            self.dispatcher.notify()
        if outbound and self.transport is not None:
            self.transport.notify()

    def transaction(self) -> Transaction:
        """Queued calls that are stored together, with one fsync, or not at all."""
        return Transaction(self)

    def atransaction(self) -> Transaction:
        """``async with cage.atransaction() as xa:``: a transaction that awaits durability."""
        return Transaction(self)

    # ---- looking at it -------------------------------------------------------------------

    def call_status(self, call_id: str) -> CallStatus:
        """Where a call made by this cage (or accepted by it) is: see CallStatus."""
        return self._store().status(call_id)

    def dead_letters(self) -> list[DeadLetter]:
        return self._store().dead_letters()

    def replay(self, call_id: str, source: str | None = None) -> None:
        """Send a dead letter back to its queue with its attempts reset.

        `source` names the cage that made the call, when its id was given with ``id=`` and
        several cages used the same id.
        """
        self._store().revive(call_id, source)
        self._notify()

    def purge(self, call_id: str, source: str | None = None) -> None:
        """Delete a dead letter for good (`source` as for ``replay``)."""
        self._store().purge(call_id, source)

    def stats(self) -> dict[str, Any]:
        """Counters of the store, the dispatcher and the journal (docs/cage.md)."""
        store = self._store()
        stats = store.stats()
        if self.dispatcher is not None:
            stats["dispatch"] = dict(self.dispatcher.counters)
        return stats

    def drain(self, timeout: float | None = None) -> None:
        """Wait until every queued call has completed or gone to the dead letters.

        Calls waiting for another cage count too, so with peers this also waits for the
        transport to deliver them.

        Raises:
            Timeout: calls were still pending after `timeout` seconds.
        """
        deadline = self._drain_deadline(timeout)
        while not self._drained(deadline, timeout):
            time.sleep(DRAIN_POLL_SECONDS)

    async def adrain(self, timeout: float | None = None) -> None:
        """``drain`` for asyncio code."""
        deadline = self._drain_deadline(timeout)
        while not self._drained(deadline, timeout):
            await asyncio.sleep(DRAIN_POLL_SECONDS)

    def _drain_deadline(self, timeout: float | None) -> float | None:
        self._store()
        return None if timeout is None else time.monotonic() + timeout

    def _drained(self, deadline: float | None, timeout: float | None) -> bool:
        outstanding = self._store().outstanding()
        if outstanding and deadline is not None and time.monotonic() > deadline:
            raise Timeout(f"cage {self.name!r}: {outstanding} calls still pending after "
                          f"{timeout} s")
        return not outstanding


class Transaction:
    """Collects queued calls; stores them in one frame when the block ends without an error.

    ``xa.on(...).module.method(...)`` returns None; after the block ``xa.call_ids`` holds the
    ids in call order.
    """

    def __init__(self, cage: Cage) -> None:
        cage._store()  # a stopped cage refuses at once, not at the first call
        self._cage = cage
        self._calls: list[NewCallFields] = []
        self._ids: Sequence[str] = ()
        self._local = self._outbound = False  # what the commit stored: who to wake
        # The cage's encoder appends straight to this transaction's list: no frame in between.
        self._proxy: Proxy[None] = Proxy(functools.partial(cage._new_call, self._calls),
                                         queued_only=True)
        self._plain: dict[str, Target[None]] = {}

    def on(self, target: str, *, id: str | None = None,
           expires_in: float | None = None) -> Target[None]:
        if id is None and expires_in is None:
            # The common case without the proxy's option checks: transactions make thousands
            # of calls, and every layer between the user and the store shows in their speed.
            found = self._plain.get(target)
            if found is None:
                found = self._plain[target] = self._proxy.on(target)
            return found
        return self._proxy.on(target, id=id, expires_in=expires_in)

    def _commit_begin(self) -> int:
        if not self._calls:
            return 0
        ids, seq = self._cage._store().enqueue(self._calls, self._cage._limit)
        self._ids = ids
        routes = set(map(_OUTBOUND, self._calls))
        self._local, self._outbound = False in routes, True in routes
        self._calls.clear()
        return seq

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self._calls.clear()
            return
        seq = self._commit_begin()
        if seq:
            self._cage._store().journal.sync(seq)
            self._cage._notify(self._local, self._outbound)

    @property
    def call_ids(self) -> list[str]:
        """The ids of the calls the block stored, in call order (empty before it ends)."""
        return list(self._ids)

    async def __aenter__(self) -> Transaction:
        return self

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self._calls.clear()
            return
        seq = self._commit_begin()
        if seq:
            await self._cage._store().journal.sync_async(seq)
            self._cage._notify(self._local, self._outbound)


_running_loop = running_loop
_OUTBOUND = operator.itemgetter(1)  # of a NewCallFields


def _import(target: str) -> object:
    """The object an import path names: ``"pkg.mod"`` or ``"pkg.mod:attribute"``."""
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    if not attribute:
        return module
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no attribute {attribute!r} "
                          f"(from the import path {target!r})") from None


def _handler_cage() -> Cage:
    cage = current_cage()
    if cage is None:
        raise RuntimeError("pmq.execute and pmq.aexecute work inside a handler; elsewhere use "
                           "cage.execute / cage.aexecute")
    return cage  # type: ignore[no-any-return]


def _submit_current(spec: MethodRef[Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
    return _handler_cage()._submit(spec, args, kwargs)


async def _asubmit_current(spec: MethodRef[Any], args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> Any:
    return await _handler_cage()._asubmit(spec, args, kwargs)


execute: Proxy[Any] = Proxy(_submit_current)
aexecute: Proxy[Any] = Proxy(_asubmit_current)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _finish(loop: asyncio.AbstractEventLoop) -> None:
    """Close a cage's own loop as asyncio.run would: cancel what is left (a connection being
    accepted as the cage stopped, say) and let it end, so no socket outlives the loop. Unlike
    asyncio.run it does not wait for the default executor: a stuck handler must not hold up
    stop()."""
    try:
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
