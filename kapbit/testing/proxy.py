"""A small asyncio TCP proxy for fault injection in tests.

Kafka clients learn broker addresses from metadata, so a proxy in front of a broker only sees
the client traffic if the broker *advertises* the proxy address (see
:meth:`kapbit.testing.broker.LocalBroker.behind_proxy`).

Besides cutting connections, the proxy can lose acknowledgements for real
(:meth:`TcpProxy.lose_acks`): it follows the Kafka frames of every connection, lets a produce
request through to the broker, and resets the connection when the response comes back,
before any of it reaches the client. The records land; the client never learns it.
"""

from __future__ import annotations

import asyncio
import contextlib

from kapbit._lifecycle import AsyncResource

__all__ = ["TcpProxy"]

_CHUNK = 64 * 1024
_PRODUCE = 0  # Kafka api key of a produce request


class _Frames:
    """Follows the frames of one direction of a Kafka connection (int32 size, then the
    payload) and reports where each starts, with the first ``head`` bytes of its payload."""

    def __init__(self, head: int) -> None:
        self._head = head
        self._skip = 0  # payload bytes of the current frame still to pass
        self._buf = bytearray()  # size and head of the next frame, as far as seen
        self._start = 0  # where the frame being assembled began in the current chunk

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """``(start, head)`` of every frame whose head completes in ``data``; ``start`` is
        its position in ``data``, -1 if it began in an earlier chunk."""
        found: list[tuple[int, bytes]] = []
        i = 0
        if self._buf:
            self._start = -1
        while i < len(data):
            if self._skip:
                n = min(self._skip, len(data) - i)
                self._skip -= n
                i += n
                continue
            if not self._buf:
                self._start = i
            want = 4 + self._head - len(self._buf)
            piece = data[i : i + want]
            self._buf += piece
            i += len(piece)
            if len(self._buf) < 4 + self._head:
                break
            size = int.from_bytes(self._buf[:4], "big", signed=True)
            found.append((self._start, bytes(self._buf[4:])))
            self._skip = max(0, size - self._head)
            self._buf.clear()
        return found


class _Link:
    """One proxied client connection and its upstream counterpart."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.tainted = False  # data was dropped while blackholed
        self.requests = _Frames(head=8)  # api key, api version, correlation id
        self.responses = _Frames(head=4)  # correlation id
        self.lost: set[int] = set()  # correlation ids whose responses must not arrive

    def abort(self) -> None:
        """Reset both sockets and cancel the pumps (except the calling task)."""
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class TcpProxy(AsyncResource):
    """Forward TCP connections from a free loopback port to ``target_host:target_port``.

    ``cut()`` aborts every live connection and closes new ones until ``restore()``;
    ``cut(blackhole=True)`` instead keeps sockets open but silently drops all bytes, so clients
    see request timeouts rather than connection resets.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._listen_host = listen_host
        self._listen_port = listen_port
        self._connect_timeout = connect_timeout
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._cut = False
        self._blackhole = False
        self._changed: asyncio.Condition | None = None
        self.connections_total = 0
        """Connections accepted and forwarded (or blackholed) since start."""
        self.connections_rejected = 0
        """Connections accepted and immediately closed because the proxy was cut."""
        self._acks_to_lose = 0
        self.acks_lost = 0
        """Produce responses dropped (their connections reset) by :meth:`lose_acks`."""

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the listening socket (idempotent)."""
        if self._server is not None:
            return
        self._changed = asyncio.Condition()
        self._server = await asyncio.start_server(
            self._handle, self._listen_host, self._listen_port
        )
        self._listen_port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Close the listener and abort every live connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await self._abort_all()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5.0)

    # -- properties ------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._listen_host

    @property
    def port(self) -> int:
        """Listening port (only meaningful after ``start()`` when created with port 0)."""
        return self._listen_port

    @property
    def address(self) -> str:
        """``host:port`` clients should connect to."""
        return f"{self._listen_host}:{self._listen_port}"

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def connections_active(self) -> int:
        return len(self._links)

    @property
    def acks_pending(self) -> int:
        """Acknowledgements :meth:`lose_acks` has yet to lose."""
        return self._acks_to_lose

    # -- fault injection -------------------------------------------------------------------

    async def cut(self, *, blackhole: bool = False) -> None:
        """Break connectivity until :meth:`restore`.

        Default: abort all live connections (clients see a reset) and close new ones on accept.
        ``blackhole=True``: keep connections open but drop all data in both directions.
        """
        self._cut = True
        self._blackhole = blackhole
        if not blackhole:
            await self._abort_all()
        await self._notify()

    def lose_acks(self, count: int = 1) -> None:
        """Lose the acknowledgements of the next ``count`` produce requests.

        Each request still reaches the broker, which appends its records; then the
        connection is reset before any byte of the response reaches the client. A Kafka
        producer sees a connection error and (without idempotence) sends the records again.
        """
        self._acks_to_lose += count

    async def restore(self) -> None:
        """Resume forwarding. Connections that lost data while blackholed are aborted."""
        self._cut = False
        self._blackhole = False
        tainted = [link for link in self._links if link.tainted or link.upstream is None]
        await self._abort(tainted)
        await self._notify()

    async def wait_for_connections(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``connections_total + connections_rejected >= count``."""
        cond = self._require_started()
        async with cond:
            await asyncio.wait_for(
                cond.wait_for(lambda: self.connections_total + self.connections_rejected >= count),
                timeout,
            )

    # -- internals -------------------------------------------------------------------------

    def _require_started(self) -> asyncio.Condition:
        if self._changed is None:
            raise RuntimeError("TcpProxy is not started")
        return self._changed

    async def _notify(self) -> None:
        cond = self._require_started()
        async with cond:
            cond.notify_all()

    async def _abort(self, links: list[_Link]) -> None:
        tasks: list[asyncio.Task[None]] = []
        for link in links:
            self._links.discard(link)
            link.abort()
            tasks.extend(link.tasks)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _abort_all(self) -> None:
        await self._abort(list(self._links))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut and not self._blackhole:
            self.connections_rejected += 1
            writer.transport.abort()
            await self._notify()
            return
        link = _Link(writer)
        self._links.add(link)
        self.connections_total += 1
        await self._notify()
        if self._blackhole:
            link.tainted = True
            link.tasks = [asyncio.create_task(self._discard(reader, link))]
            await asyncio.gather(*link.tasks, return_exceptions=True)
            self._finish(link)
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port),
                self._connect_timeout,
            )
        except (OSError, TimeoutError):
            self._links.discard(link)
            writer.transport.abort()
            return
        if link not in self._links:  # cut/stop happened while connecting
            up_writer.transport.abort()
            return
        link.upstream = up_writer
        link.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, link, upstream=True)),
            asyncio.create_task(self._pump(up_reader, writer, link, upstream=False)),
        ]
        await asyncio.gather(*link.tasks, return_exceptions=True)
        self._finish(link)

    def _finish(self, link: _Link) -> None:
        self._links.discard(link)
        for w in (link.client, link.upstream):
            if w is not None:
                w.close()

    async def _discard(self, reader: asyncio.StreamReader, link: _Link) -> None:
        try:
            while await reader.read(_CHUNK):
                pass
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            link.abort()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        *,
        upstream: bool,
    ) -> None:
        try:
            while data := await reader.read(_CHUNK):
                if self._blackhole:
                    link.tainted = True
                    continue
                if upstream:
                    self._mark_produce_requests(link, data)
                elif (cut := self._lost_ack_at(link, data)) is not None:
                    writer.write(data[:cut])
                    self.acks_lost += 1
                    break  # the finally clause resets both sides
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            # One side finished: tear down both directions (Kafka never half-closes).
            link.abort()

    def _mark_produce_requests(self, link: _Link, data: bytes) -> None:
        """Note the correlation ids of produce requests whose acknowledgement is to be lost."""
        for _, head in link.requests.feed(data):
            if self._acks_to_lose and int.from_bytes(head[:2], "big") == _PRODUCE:
                self._acks_to_lose -= 1
                link.lost.add(int.from_bytes(head[4:8], "big", signed=True))

    def _lost_ack_at(self, link: _Link, data: bytes) -> int | None:
        """Where in ``data`` a response to be lost starts (0 if it began earlier), if any."""
        for start, head in link.responses.feed(data):
            if int.from_bytes(head, "big", signed=True) in link.lost:
                return max(start, 0)
        return None
