"""A TCP proxy on 127.0.0.1 that breaks the connections between two cages on command.

Owns: relaying bytes between a client (the cage that connects) and a server (the cage that
listens), and the faults a network makes: cut a connection after N more bytes in one direction
(mid-frame, with a FIN or a RST), stall all traffic, delay every chunk, split every write into
tiny pieces. Must not: parse pmq frames, know what a cage is, or assert anything (the tests do).

Directions are named from the client's side: ``"up"`` is client -> server, ``"down"`` server ->
client. The proxy runs its own event loop on a daemon thread; its commands are plain methods
that may be called from any thread.

Invariants:
- Bytes go through in order and unchanged, except that a cut drops whatever follows its point.
- A cut is one-shot: it fires once, on the connection that carries its N-th byte, then clears.
- Nothing here measures or asserts on time; ``delay`` and ``stall`` only slow traffic down.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["up", "down"]
READ_BYTES = 64 * 1024


@dataclass
class _Cut:
    remaining: int
    reset: bool
    fired: threading.Event = field(default_factory=threading.Event)


class _Pair:
    """One client connection and the proxy's connection to the server for it."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.tasks: list[asyncio.Task[None]] = []
        self.severed = False

    def sever(self, reset: bool) -> None:
        """End both sides now: with RST (``reset``), or with FIN after what was written."""
        if self.severed:
            return
        self.severed = True
        for writer in (self.client, self.server):
            if reset:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class TcpProxy:
    """Relays 127.0.0.1:<port> to ``target``; faults are switched on and off by the methods.

    Attributes:
        delay: seconds to wait before relaying each chunk read (0: none).
        split: relay each chunk as writes of at most this many bytes (None: whole chunks).
        counters: bytes relayed per direction, connections accepted, cuts fired.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.delay = 0.0
        self.split: int | None = None
        self.counters = {"up": 0, "down": 0, "connections": 0, "cuts": 0}
        self._cuts: dict[str, _Cut | None] = {"up": None, "down": None}
        self._pairs: set[_Pair] = set()
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy",
                                        daemon=True)
        self.port = 0

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        """``"127.0.0.1:<port>"``, for a cage's ``peers``."""
        return f"127.0.0.1:{self.port}"

    # ---- commands --------------------------------------------------------------------------

    def cut_after(self, direction: Direction, nbytes: int, *, reset: bool = False
                  ) -> threading.Event:
        """Relay ``nbytes`` more bytes in ``direction`` (on any connection), then cut the
        connection that carries them: both of its sides, with RST if ``reset`` else FIN.

        Returns:
            An Event set once the cut has happened.
        """
        cut = _Cut(nbytes, reset)
        self._cuts[direction] = cut
        return cut.fired

    def disarm(self) -> None:
        """Forget the cuts that have not fired yet."""
        self._cuts = {"up": None, "down": None}

    def sever_all(self, *, reset: bool = False) -> None:
        """Cut every connection now."""
        self._call(self._sever_all(reset))

    def stall(self) -> None:
        """Stop relaying (both directions) until ``resume``; bytes wait, nothing is lost."""
        self._loop.call_soon_threadsafe(self._flowing_event().clear)

    def resume(self) -> None:
        """Relay again what ``stall`` held back, and what follows."""
        self._loop.call_soon_threadsafe(self._flowing_event().set)

    @contextlib.contextmanager
    def stalled(self) -> Iterator[None]:
        """``with proxy.stalled():`` no traffic in the block."""
        self.stall()
        try:
            yield
        finally:
            self.resume()

    # ---- the relay -------------------------------------------------------------------------

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    def _flowing_event(self) -> asyncio.Event:
        assert self._flowing is not None, "start() the proxy first"
        return self._flowing

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._sever_all(reset=False)
        await self._server.wait_closed()

    async def _sever_all(self, reset: bool) -> None:
        for pair in list(self._pairs):
            pair.sever(reset)
        tasks = [task for pair in list(self._pairs) for task in pair.tasks]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        self.counters["connections"] += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        for writer in (client_writer, server_writer):
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # tiny writes stay tiny
        pair = _Pair(client_writer, server_writer)
        self._pairs.add(pair)
        pair.tasks = [asyncio.ensure_future(self._pump(client_reader, server_writer, "up", pair)),
                      asyncio.ensure_future(self._pump(server_reader, client_writer, "down",
                                                       pair))]
        try:
            await asyncio.gather(*pair.tasks, return_exceptions=True)
        finally:
            self._pairs.discard(pair)
            pair.sever(reset=False)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: Direction, pair: _Pair) -> None:
        flowing = self._flowing_event()
        try:
            while True:
                chunk = await reader.read(READ_BYTES)
                if not chunk:  # a clean half-close: pass it on
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                await flowing.wait()
                if self.delay:
                    await asyncio.sleep(self.delay)
                    await flowing.wait()
                cut = self._cuts[direction]
                if cut is not None and len(chunk) >= cut.remaining:
                    self._cuts[direction] = None
                    await self._write(writer, chunk[:cut.remaining], direction)
                    with contextlib.suppress(OSError):  # let the partial frame go out first
                        while writer.transport.get_write_buffer_size():
                            await asyncio.sleep(0.001)
                    self.counters["cuts"] += 1
                    cut.fired.set()
                    pair.sever(cut.reset)
                    return
                if cut is not None:
                    cut.remaining -= len(chunk)
                await self._write(writer, chunk, direction)
        except (OSError, asyncio.IncompleteReadError):
            pair.sever(reset=True)

    async def _write(self, writer: asyncio.StreamWriter, data: bytes,
                     direction: Direction) -> None:
        step = self.split or len(data) or 1
        for start in range(0, len(data), step):
            piece = data[start:start + step]
            writer.write(piece)
            self.counters[direction] += len(piece)
            await writer.drain()
            if self.split:
                await asyncio.sleep(0)  # one segment each: let the peer read them one by one
