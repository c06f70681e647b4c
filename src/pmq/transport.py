"""Cage to cage over TCP: asyncio streams that feed bytes to ``pmq.protocol``.

Owns: listening and accepting, one outbound link per peer (connect, try its addresses in order,
reconnect with exponential backoff and jitter), TLS and the check that a peer's certificate
names the cage it claims to be, streaming each peer's outbound calls and settling their
acknowledgements, acknowledging what peers sent only once it is durable, synchronous RPC, and
keepalive. Must not: parse frames (the protocol does), decide what a call may do (the cage
gives ``refuse`` and ``serve``), or run handlers.

Invariants:
- A call leaves this cage in key order per peer, and an acknowledgement is sent only after the
  calls it covers and the link's new high-water mark are durable on this cage (one frame).
- Calls sent and not acknowledged when a connection ends go back to the front of their queue
  and are sent again on the next connection; the receiver drops the ones it already has.
- A peer that breaks the protocol, fails the handshake or goes silent loses its connection,
  with a log line that says who and why; every other connection carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import operator
import random
import ssl
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from pmq import protocol
from pmq._calls import StoredCall
from pmq._loops import running_loop
from pmq.errors import (
    AuthenticationError,
    JournalFailed,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    Timeout,
    TransportError,
)
from pmq.store import Store

__all__ = ["READ_BYTES", "Transport", "read_events"]

log = logging.getLogger("pmq.transport")

_ARGUMENTS = operator.attrgetter("arguments")
_DEADLINE = operator.attrgetter("deadline")

READ_BYTES = 256 * 1024
CONNECT_TIMEOUT_S = 5.0
HANDSHAKE_TIMEOUT_S = 10.0
KEEPALIVE_S = 10.0  # a link that sent nothing for this long sends PING
IDLE_TIMEOUT_S = 45.0  # a connection that received nothing for this long is dropped
BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 5.0
BATCH_MAX_CALLS = 2048
RPC_DEFAULT_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 0.5
_ACCEPT_STEPS = 3  # loop steps from accepting a socket to its protocol's connection_made

#: serve(source, module, method, arguments) -> (ok, result bytes, (type, message, traceback))
Serve = Callable[[str, str, str, bytes], Awaitable[tuple[bool, bytes | None,
                                                         tuple[str, str, str] | None]]]


class Transport:
    """The network side of one cage.

    Args:
        cage: this cage's name; journal_id: its journal's id (scopes its calls' keys).
        store: where outbound calls wait and accepted calls go.
        listen: (host, port) to accept peers on, or None.
        peers: {peer name: [(host, port), ...]} to send calls to.
        secret: shared secret for the handshake, or None.
        tls_server, tls_client: ssl contexts for accepting and connecting, or None.
        refuse: ``refuse(source, module, method)`` -> a reason to refuse a call, or None.
        serve: runs a synchronous call from a peer.
        accepted: called when calls from a peer were appended to the journal (the cage wakes
            its dispatcher, which may take them at once: no handler runs before its ATTEMPT
            record, which comes later in the journal, is durable).
    """

    def __init__(self, cage: str, journal_id: bytes, store: Store, *,
                 listen: tuple[str, int] | None,
                 peers: dict[str, list[tuple[str, int]]],
                 secret: bytes | None,
                 tls_server: ssl.SSLContext | None,
                 tls_client: ssl.SSLContext | None,
                 refuse: Callable[[str, str, str], str | None],
                 serve: Serve,
                 accepted: Callable[[], None]) -> None:
        self.cage = cage
        self.journal_id = journal_id
        self.store = store
        self.listen = listen
        self.secret = secret
        self.tls_server = tls_server
        self.tls_client = tls_client
        self._refuse = refuse
        self._serve = serve
        self._accepted = accepted
        self.links = {peer: _Link(self, peer, addresses) for peer, addresses in peers.items()}
        self.address: tuple[str, int] | None = None  # where it listens (the real port)
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_due = False  # a _wake_all is scheduled and has not started
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connections: set[asyncio.StreamWriter] = set()
        self._accepting: weakref.WeakSet[_Accepted] = weakref.WeakSet()
        self.counters = dict.fromkeys(("sent", "transmitted", "refused", "accepted_batches",
                                       "connections", "rejected_connections"), 0)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.listen is not None:
            host, port = self.listen
            self._server = await self._loop.create_server(self._new_connection, host, port,
                                                          ssl=self.tls_server)
            sockname = self._server.sockets[0].getsockname()
            self.address = (sockname[0], sockname[1])
            log.info("cage %s listens on %s:%d%s", self.cage, *self.address,
                     " (TLS)" if self.tls_server else "")
        for link in self.links.values():
            self._spawn(link.run())

    async def stop(self) -> None:
        if self._server is not None:
            # Connections accepted in the loop's last step are still on their way to a handler.
            # Closing the server under them makes asyncio (3.11) drop them silently, sockets
            # open (Server._attach asserts the server is open). So stop accepting, let them
            # reach their handlers (or at least connection_made), then close.
            with contextlib.suppress(NotImplementedError):  # the proactor loop has no readers
                for sock in self._server.sockets:
                    asyncio.get_running_loop().remove_reader(sock.fileno())
            for _ in range(_ACCEPT_STEPS):
                await asyncio.sleep(0)
            self._server.close()
        writers = list(self._connections)
        for link in self.links.values():
            if link._writer is not None:
                writers.append(link._writer)
        for writer in writers:
            writer.close()
        # TLS says goodbye (close_notify) through the event loop: let it, briefly, so sockets
        # are really closed before the loop ends.
        await asyncio.gather(*(_closed(w) for w in writers))
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            # Cancel again until they are done: a task may catch one cancellation in a race
            # with the I/O it awaited, and must not keep stop() waiting.
            await asyncio.wait(tasks, timeout=1.0)
        # A connection accepted just before the server closed may not have started its
        # handler yet, so nothing above closed it: close it here, or its socket outlives the loop.
        aborted = [made for made in (accepted.made for accepted in list(self._accepting))
                   if made is not None and not made.is_closing()]
        for made in aborted:
            made.abort()
        if aborted:
            await asyncio.sleep(0)  # abort() closes the socket in the loop's next step
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def _new_connection(self) -> _Accepted:
        """What asyncio.start_server would build, remembered so that stop() can close it."""
        accepted = _Accepted(asyncio.StreamReader(limit=READ_BYTES), self._accept)
        self._accepting.add(accepted)
        return accepted

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def notify(self) -> None:
        """New outbound calls are durable: wake the links (from any thread).

        Wake-ups from other threads coalesce: while one is scheduled and has not started, it
        will see these calls too (it clears the mark before it wakes anyone), so 64 threads
        calling execute pay one hop to the event loop between two of its turns, not one each.
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if running_loop() is loop:
            self._wake_all()
            return
        if self._wake_due:
            return
        self._wake_due = True
        try:
            loop.call_soon_threadsafe(self._wake_all)
        except RuntimeError:  # closed meanwhile: the cage is stopping
            self._wake_due = False

    def _wake_all(self) -> None:
        self._wake_due = False
        for link in self.links.values():
            link.wake.set()

    async def call(self, peer: str, module: str, method: str, arguments: bytes,
                   timeout: float | None) -> bytes:
        """Run `module.method` on `peer` and return its result bytes.

        Raises:
            RemoteError: it raised there. Timeout: no answer in time.
            TransportError: the peer cannot be reached.
        """
        link = self.links.get(peer)
        if link is None:
            raise ValueError(f"unknown peer {peer!r}: cage {self.cage!r} knows the peers: "
                             f"{', '.join(sorted(self.links)) or 'none'}")
        seconds = RPC_DEFAULT_TIMEOUT_S if timeout is None else timeout
        return await link.call(module, method, arguments, seconds)

    # ---- accepting -------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:  # stop() cancels the handlers of connections still open
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        where = _peername(writer)
        self._connections.add(writer)
        self.counters["connections"] += 1
        conn = protocol.Connection("server", self.cage, self.journal_id, secret=self.secret)
        acks: asyncio.Queue[tuple[int, int, list[tuple[int, str]]] | None] = asyncio.Queue()
        acker: asyncio.Task[None] | None = None
        requests: set[asyncio.Task[None]] = set()
        source = ""
        try:
            writer.write(conn.initiate())
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                established = await _handshake(reader, writer, conn)
            source = established.peer
            _check_certificate(writer, source)
            log.info("cage %s accepted a connection from cage %s at %s", self.cage, source,
                     where)
            acker = asyncio.ensure_future(self._send_acks(conn, writer, acks))
            # The link's state may include calls appended and not yet durable (this link's
            # previous connection, whose batch waits for its fsync): tell it only once durable.
            high, refusals = self.store.link_state(source, established.journal_id)
            acks.put_nowait((self.store.journal.next_seq - 1, high, refusals))
            async for event in read_events(reader, writer, conn):
                if isinstance(event, protocol.Batch):
                    seq, high, refusals = self.store.accept(
                        source, established.journal_id, event.calls, event.settled,
                        lambda module, method: self._refuse(source, module, method))
                    self.counters["accepted_batches"] += 1
                    if seq:
                        self._accepted()
                    acks.put_nowait((seq, high, refusals))
                elif isinstance(event, protocol.Request):
                    task = asyncio.ensure_future(self._answer(conn, writer, source, event))
                    requests.add(task)
                    task.add_done_callback(requests.discard)
                elif isinstance(event, protocol.Goodbye):
                    log.info("cage %s at %s closed its connection: %s", source, where,
                             event.reason)
                    return
                elif not isinstance(event, protocol.Ping | protocol.Pong):
                    raise RemoteProtocolError(f"unexpected {type(event).__name__} from a sender")
            if acker is not None:
                acks.put_nowait(None)
                await acker  # the acknowledgements of what arrived before the close
        except (ProtocolError, AuthenticationError) as exc:
            self.counters["rejected_connections"] += 1
            log.warning("cage %s dropped the connection from %s%s: %s", self.cage,
                        f"cage {source} at " if source else "", where, exc)
            _goodbye(writer, conn, str(exc))
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, OSError) as exc:
            log.info("connection from %s%s ended: %r", f"cage {source} at " if source else "",
                     where, exc)
        except JournalFailed as exc:
            log.error("cage %s cannot accept calls from %s: %s", self.cage, source or where, exc)
            _goodbye(writer, conn, "the receiving cage's journal failed")
        except asyncio.CancelledError:
            # The cage is stopping. This task belongs to asyncio's server, which would log a
            # cancellation it sees as an error; everything acknowledged is already durable.
            log.debug("connection from %s closed: cage %s is stopping", source or where,
                      self.cage)
        finally:
            for task in [*requests, *([acker] if acker else [])]:
                task.cancel()
            self._connections.discard(writer)
            writer.close()
            await _closed(writer)

    async def _send_acks(self, conn: protocol.Connection, writer: asyncio.StreamWriter,
                         acks: asyncio.Queue[tuple[int, int, list[tuple[int, str]]] | None]
                         ) -> None:
        """Acknowledge batches in order, each once its frame is durable (pipelined)."""
        while True:
            item = await acks.get()
            if item is None:
                return
            seq, high, refusals = item
            # Even a batch that stored nothing (every call a redelivery) waits: its high-water
            # mark may cover calls another connection appended and are not yet durable.
            target = seq or self.store.journal.next_seq - 1
            if self.store.visible_seq() < target:
                await self.store.journal.sync_async(target)
            if not conn.may_answer:  # the peer went away: it learns `high` when it returns
                continue
            writer.write(conn.send(protocol.Ack(high, refusals)))

    async def _answer(self, conn: protocol.Connection, writer: asyncio.StreamWriter,
                      source: str, request: protocol.Request) -> None:
        ok, result, error = await self._serve(source, request.module, request.method,
                                              request.arguments)
        if not writer.is_closing():
            writer.write(conn.send(protocol.Response(request.rpc_id, ok, result, error)))


class _Accepted(asyncio.StreamReaderProtocol):
    """An accepted connection that knows its transport from the moment it is made: asyncio's
    server (before Python 3.12) keeps no list of its connections to close."""

    made: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.made = transport
        super().connection_made(transport)


class _Link:
    """This cage's connection to one peer: it sends the peer's queue and its RPCs."""

    def __init__(self, transport: Transport, peer: str,
                 addresses: list[tuple[str, int]]) -> None:
        self.transport = transport
        self.peer = peer
        self.queue = f"{peer}_queue"
        self.addresses = addresses
        self.wake = asyncio.Event()
        self.up = asyncio.Event()
        self.last_error = "not connected yet"
        self._conn: protocol.Connection | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._rpc_ids = itertools.count(1)
        self._rpcs: dict[int, asyncio.Future[protocol.Response]] = {}
        self._in_flight: deque[StoredCall] = deque()  # sent, not acknowledged; in key order
        self._settled = 0
        self._was_up = False
        self._random = random.Random()

    async def run(self) -> None:
        failures = 0
        while True:
            for host, port in self.addresses:
                self._was_up = False
                try:
                    await self._connect(host, port)
                except asyncio.CancelledError:
                    raise
                except (ProtocolError, AuthenticationError) as exc:
                    self.last_error = f"{host}:{port}: {exc}"
                    log.warning("link %s -> %s at %s:%d dropped: %s", self.transport.cage,
                                self.peer, host, port, exc)
                except (OSError, TimeoutError, asyncio.IncompleteReadError,
                        TransportError) as exc:
                    self.last_error = f"{host}:{port}: {exc!r}"
                    log.debug("link %s -> %s at %s:%d: %r", self.transport.cage, self.peer,
                              host, port, exc)
                finally:
                    self._disconnected()
                if self._was_up:
                    failures = 0
                    break  # start again from the first address, at once
            else:
                failures += 1
                delay = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** min(failures, 20))
                await asyncio.sleep(delay * (0.5 + self._random.random() / 2))

    async def _connect(self, host: str, port: int) -> None:
        """One connection to the peer, until it fails (it always ends by raising)."""
        transport = self.transport
        tls = transport.tls_client
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=tls, limit=READ_BYTES, server_hostname=self.peer if tls else None)
        conn = protocol.Connection("client", transport.cage, transport.journal_id,
                                   secret=transport.secret, expect_peer=self.peer)
        self._writer = writer
        writer.write(conn.initiate())
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            await _handshake(reader, writer, conn)
        _check_certificate(writer, self.peer)
        self._conn = conn
        self._settled = 0
        self._was_up = True
        self.up.set()
        log.info("link %s -> %s connected to %s:%d", transport.cage, self.peer, host, port)
        tasks = {asyncio.ensure_future(self._receive(reader, writer, conn)),
                 asyncio.ensure_future(self._send(conn, writer))}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # the error that ended the connection
            raise TransportError(f"cage {self.peer} closed the connection")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _receive(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       conn: protocol.Connection) -> None:
        async for event in read_events(reader, writer, conn):
            if isinstance(event, protocol.Ack):
                self._settle(event)
            elif isinstance(event, protocol.Response):
                future = self._rpcs.pop(event.rpc_id, None)
                if future is not None and not future.done():
                    future.set_result(event)
            elif isinstance(event, protocol.Goodbye):
                raise TransportError(f"cage {self.peer} said goodbye: {event.reason}")
            elif not isinstance(event, protocol.Ping | protocol.Pong):
                raise RemoteProtocolError(f"unexpected {type(event).__name__} from a receiver")

    async def _send(self, conn: protocol.Connection, writer: asyncio.StreamWriter) -> None:
        """Stream the peer's queue in key order within its window; PING when idle."""
        store = self.transport.store
        while True:
            room_calls, room_bytes = conn.room()
            calls: list[StoredCall] = store.take(
                self.queue, min(room_calls, BATCH_MAX_CALLS), outbound=True) \
                if room_calls > 0 else []
            calls = self._drop_expired(calls)
            if calls:
                fit = calls
                if sum(map(len, map(_ARGUMENTS, calls))) > room_bytes:
                    fit = self._fit(calls, room_bytes)
                if not fit:
                    self.wake.clear()
                    await self.wake.wait()  # an acknowledgement will make room
                    continue
                self._in_flight.extend(fit)
                # Plain tuples in WireCall's order: a NamedTuple's __new__ per call was the
                # largest single cost of sending, and plain tuples of plain values are untracked
                # by the garbage collector. A replayed call (a new key, its id kept as its
                # origin) travels with that id as its user id, so the peer names it as the
                # caller was told and accepts it once, like any call with an id.
                writer.write(conn.send(protocol.Batch(self._settled, [
                    (c.key, c.module, c.method, c.arguments,
                     c.user_id if c.origin is None else c.call_id, c.deadline, c.created)
                    for c in fit])))
                self.transport.counters["sent"] += len(fit)
                await writer.drain()
                continue
            self.wake.clear()
            try:
                async with asyncio.timeout(KEEPALIVE_S):
                    await self.wake.wait()
            except TimeoutError:
                writer.write(conn.send(protocol.Ping()))

    def _fit(self, calls: list[StoredCall], room_bytes: int) -> list[StoredCall]:
        """The first of `calls` that fit in the window's `room_bytes` (at least one when
        nothing is in flight); the rest go back to the queue, to be sent next time."""
        fit: list[StoredCall] = []
        size = 0
        for index, call in enumerate(calls):
            if size + len(call.arguments) > room_bytes and (fit or self._in_flight):
                self.transport.store.give_back(calls[index:])
                break
            fit.append(call)
            size += len(call.arguments)
        return fit

    def _drop_expired(self, calls: list[StoredCall]) -> list[StoredCall]:
        if not any(map(_DEADLINE, calls)):
            return calls
        now = time.time()
        live = []
        for call in calls:
            if call.deadline is not None and call.deadline < now:
                self.transport.store.bury(call, "expired",
                                          f"its deadline passed before cage {self.peer} "
                                          f"accepted it")
                log.warning("call %s to %s expired before it could be delivered", call.call_id,
                            self.peer)
            else:
                live.append(call)
        return live

    def _settle(self, ack: protocol.Ack) -> None:
        refused = dict(ack.refused)
        in_flight = self._in_flight
        settled: list[StoredCall]
        if in_flight and in_flight[-1].key <= ack.high:
            # The usual ACK covers everything sent (keys rise along the deque): moved whole,
            # not popped call by call.
            settled = list(in_flight)
            in_flight.clear()
        else:
            settled = []
            while in_flight and in_flight[0].key <= ack.high:
                settled.append(in_flight.popleft())
        seq = self.transport.store.settle_outbound(self.queue, ack.high, refused, settled)
        transmitted = self.transport.counters
        transmitted["refused"] += len(refused)
        for key, reason in ack.refused:
            log.warning("cage %s refused call key %d: %s", self.peer, key, reason)
        self.wake.set()
        if not seq:
            self._settled = max(self._settled, ack.high)
            return
        durable = self.transport.store.journal.sync_async(seq)

        def mark(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and future.exception() is None:
                self._settled = max(self._settled, ack.high)

        durable.add_done_callback(mark)

    def _disconnected(self) -> None:
        self.up.clear()
        self._conn = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._in_flight:
            self.transport.store.give_back(self._in_flight)
            self._in_flight.clear()
        for future in self._rpcs.values():
            if not future.done():
                future.set_exception(TransportError(
                    f"the connection to cage {self.peer} was lost before it answered"))
        self._rpcs.clear()

    async def call(self, module: str, method: str, arguments: bytes, timeout: float) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout(timeout):
                await self.up.wait()
        except TimeoutError:
            raise TransportError(f"cage {self.peer} cannot be reached within {timeout} s "
                                 f"({self.last_error})") from None
        conn, writer = self._conn, self._writer
        if conn is None or writer is None:
            raise TransportError(f"cage {self.peer} cannot be reached ({self.last_error})")
        rpc_id = next(self._rpc_ids)
        try:
            request = conn.send(protocol.Request(rpc_id, module, method, arguments,
                                                 max(0.0, deadline - loop.time())))
        except ProtocolError as exc:  # e.g. too many requests without an answer
            raise TransportError(f"cannot send {module}.{method} to cage {self.peer}: "
                                 f"{exc}") from None
        future: asyncio.Future[protocol.Response] = loop.create_future()
        self._rpcs[rpc_id] = future
        writer.write(request)
        try:
            async with asyncio.timeout_at(deadline):
                response = await future
        except TimeoutError:
            conn.abandon(rpc_id)
            raise Timeout(f"{module}.{method} on cage {self.peer} did not answer within "
                          f"{timeout} s; it may still run there") from None
        finally:
            self._rpcs.pop(rpc_id, None)
        if not response.ok:
            assert response.error is not None
            raise RemoteError(*response.error)
        assert response.result is not None
        return response.result


# ---- helpers shared by both ends ---------------------------------------------------------------


async def _handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: protocol.Connection) -> protocol.Established:
    async for event in read_events(reader, writer, conn):
        if isinstance(event, protocol.Established):
            return event
        if isinstance(event, protocol.Goodbye):
            raise AuthenticationError(f"the peer refused the handshake: {event.reason}")
    raise TransportError("the peer closed the connection during the handshake")


async def read_events(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: protocol.Connection) -> Any:
    """The protocol's events from `reader` until a clean close; its own replies are written."""
    while True:
        event = conn.next_event()
        reply = conn.data_to_send()
        if reply:
            writer.write(reply)
        if event is protocol.NEED_DATA:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that arrives as the read completes, and stop() then waited for ever.
            async with asyncio.timeout(IDLE_TIMEOUT_S):
                data = await reader.read(READ_BYTES)
            conn.receive_data(data)
            continue
        if isinstance(event, protocol.ConnectionClosed):
            return
        yield event
        if writer.transport.get_write_buffer_size() > READ_BYTES:
            await writer.drain()


def _check_certificate(writer: asyncio.StreamWriter, peer: str) -> None:
    """With TLS, the peer's certificate must name exactly the cage it said it is."""
    tls = writer.get_extra_info("ssl_object")
    if tls is None:
        return
    cert = tls.getpeercert()
    if not cert:
        raise AuthenticationError(f"cage {peer!r} presented no certificate (the TLS context "
                                  f"must require and verify one)")
    names = {value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}
    names |= {value for rdn in cert.get("subject", ()) for key, value in rdn
              if key == "commonName"}
    if peer not in names:
        raise AuthenticationError(f"the certificate of the peer that says it is cage {peer!r} "
                                  f"names {sorted(names)}")


async def _closed(writer: asyncio.StreamWriter) -> None:
    """Wait briefly for a closing connection to close (TLS says goodbye through the loop), then
    drop it: a peer too busy to answer must not keep the socket open once the loop is gone."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await writer.wait_closed()
    except Exception:  # a timeout, or the connection's own error: either way, let it go
        writer.transport.abort()


def _goodbye(writer: asyncio.StreamWriter, conn: protocol.Connection, reason: str) -> None:
    with contextlib.suppress(Exception):
        writer.write(conn.send(protocol.Goodbye(reason[:1000])))


def _peername(writer: asyncio.StreamWriter) -> str:
    name = writer.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        return f"{name[0]}:{name[1]}"
    return str(name)

