"""The proxy's upstream client: pooled keep-alive HTTP/1.1 connections to the workers, one asyncio protocol each,
answers parsed by llhttp (httptools), bodies handed over chunk by chunk as they arrive.

Why not aiohttp's ClientSession here (it still serves health probes and admin calls): its request path builds a
URL object, a ClientRequest, a header multidict, cookie and tracing hooks and a timer context for every call,
which cost the router as many instructions as aiohttp's whole server side (bench/router_instructions.py). The
proxy needs none of it: it sends one POST of bytes it already holds to a worker it already knows.

Failures are typed for failover (router.proxy): `ConnectError` when nothing reached the worker, `TransportError`
when the connection broke, timed out or answered something that is not HTTP after the request went out.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from urllib.parse import urlsplit

import httptools

# Past this much unread answer the connection stops reading (TCP pushes back on the worker) until it is drained.
_HIGH_WATER = 1 << 18


class UpstreamError(Exception):
    """A request that got no complete, well-formed answer from its worker."""


class ConnectError(UpstreamError):
    """The worker could not be reached: no byte of the request went out."""


class TransportError(UpstreamError):
    """The connection broke, timed out or carried something that is not HTTP after the request went out."""


class ReadTimeout(TransportError):
    """No byte of the answer arrived within the read timeout."""


class _Origin:
    """Where a worker URL points: the address to connect to and the bytes each request starts with."""

    __slots__ = ("host", "port", "ssl", "base", "host_header")

    def __init__(self, url: str):
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = u.hostname
        self.ssl = u.scheme == "https"
        self.port = u.port or (443 if self.ssl else 80)
        self.base = u.path.rstrip("/").encode()
        default = u.port is None or u.port == (443 if self.ssl else 80)
        self.host_header = (self.host if default else f"{self.host}:{self.port}").encode("idna")


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one answer in flight on it."""

    def __init__(self, pool: UpstreamPool, origin: _Origin):
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.idle_since = 0.0

    # ---- asyncio.Protocol ----

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # bytes nobody asked for on an idle connection: it cannot be reused
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.response._fail(TransportError(f"malformed answer ({type(exc).__name__})"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        r = self.response
        if r is None:
            return
        if r.status and not r._complete and r._error is None and exc is None \
                and "content-length" not in r.headers and "chunked" not in r.headers.get("transfer-encoding", ""):
            r._complete = True  # a body without a length ends where the connection does (RFC 9112, 6.3)
            r._wake()
        else:
            r._fail(TransportError("the worker closed the connection"))

    # ---- llhttp callbacks ----

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        r = self.response
        r.status = self.parser.get_status_code()
        r._wake()

    def on_body(self, body: bytes) -> None:
        r = self.response
        r._chunks.append(body)
        r._buffered += len(body)
        if r._buffered > _HIGH_WATER and not r._paused:
            r._paused = True
            self.transport.pause_reading()
        r._wake()

    def on_message_complete(self) -> None:
        r = self.response
        r._complete = True
        r._reusable = self.parser.should_keep_alive()
        r._wake()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """A worker's answer: `status` and `headers` (names lower-case) on return from `UpstreamPool.post`, the body
    through `readany` or `read`. End with `release` (returns a fully read connection to the pool) or `close`."""

    def __init__(self, conn: _Connection, read_timeout: float | None):
        self._conn = conn
        self._read_timeout = read_timeout
        self.status = 0
        self.headers: dict[str, str] = {}
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._complete = False
        self._reusable = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future | None = None
        self._done = False

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: UpstreamError) -> None:
        if not self._complete and self._error is None:
            self._error = exc
        self._wake()

    def _timed_out(self) -> None:
        self._fail(ReadTimeout(f"no answer within {self._read_timeout:g} s"))
        self._conn.close()

    async def _wait(self) -> None:
        loop = self._conn.pool.loop
        self._waiter = loop.create_future()
        timer = loop.call_later(self._read_timeout, self._timed_out) if self._read_timeout else None
        try:
            await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def _head(self) -> None:
        while not self.status:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def readany(self) -> bytes:
        """The next piece of the body as it arrived; b"" once the body is complete."""
        while True:
            if self._chunks:
                data = self._chunks.popleft()
                self._buffered -= len(data)
                if self._paused and self._buffered <= _HIGH_WATER // 4:
                    self._paused = False
                    if not self._conn.closed:
                        self._conn.transport.resume_reading()
                return data
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def at_eof(self) -> bool:
        return self._complete and not self._chunks

    def release(self) -> None:
        """Done with the answer: a fully read one gives its connection back for the next request."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        conn.response = None
        if self._complete and not self._chunks and self._reusable and not conn.closed:
            conn.pool._put(conn)
        else:
            conn.close()
            conn.pool._forget()

    def close(self) -> None:
        """Done early: the connection is closed, which tells the worker to abort the request."""
        if self._done:
            return
        self._done = True
        self._conn.response = None
        self._conn.close()
        self._conn.pool._forget()


class UpstreamPool:
    """Keep-alive connections to every worker, at most `limit` open at once (0: no limit), idle ones closed after
    `keepalive_s`. `post` waits for a free slot when the limit is reached."""

    def __init__(self, limit: int = 0, connect_timeout: float | None = None, read_timeout: float | None = None,
                 keepalive_s: float = 60.0):
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_s = keepalive_s
        self.loop = asyncio.get_running_loop()
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._open = 0  # connections open or being opened, idle ones included
        self._slots: deque[asyncio.Future] = deque()  # posts waiting for the limit
        self._ssl: ssl.SSLContext | None = None

    def origin(self, url: str) -> _Origin:
        o = self._origins.get(url)
        if o is None:
            o = self._origins[url] = _Origin(url)
        return o

    async def post(self, url: str, path: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """Send `body` to `url` + `path` and wait for the answer's status and headers."""
        origin = self.origin(url)
        conn = await self._acquire(origin)
        resp = UpstreamResponse(conn, self.read_timeout)
        conn.response = resp
        try:
            head = [b"POST ", origin.base, path.encode(), b" HTTP/1.1\r\nHost: ", origin.host_header,
                    b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
            for k, v in headers.items():
                if "\n" in v or "\r" in v:
                    raise ValueError(f"header {k} holds a line break")
                head += (k.encode("latin-1"), b": ", v.encode(), b"\r\n")
            head += (b"\r\n", body)
            conn.transport.write(b"".join(head))
            await resp._head()
        except BaseException:
            resp.close()
            raise
        return resp

    async def _acquire(self, origin: _Origin) -> _Connection:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_s:
                return conn
            conn.close()
            self._forget()
        if not self.limit or self._open < self.limit:
            self._open += 1
        elif not self._evict_idle():  # (an evicted idle connection's slot becomes this one's)
            slot = self.loop.create_future()
            self._slots.append(slot)
            try:
                await slot  # a closed connection's slot, handed over by _forget (_open still counts it)
            except BaseException:
                if slot.done() and not slot.cancelled():
                    self._forget()  # handed over just as this post was cancelled: pass it on
                elif slot in self._slots:  # _forget may have dropped it already, as a cancelled waiter
                    self._slots.remove(slot)
                raise
        try:
            return await self._connect(origin)
        except BaseException:
            self._forget()
            raise

    async def _connect(self, origin: _Origin) -> _Connection:
        if origin.ssl and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            coro = self.loop.create_connection(lambda: _Connection(self, origin), origin.host, origin.port,
                                               ssl=self._ssl if origin.ssl else None)
            _, conn = await asyncio.wait_for(coro, self.connect_timeout)
        except asyncio.TimeoutError:
            raise ConnectError(f"no connection within {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect ({type(exc).__name__})") from None
        return conn

    def _evict_idle(self) -> bool:
        """At the limit: close the longest-idle connection to any worker, its slot taken over by the caller."""
        conns = min((c for c in self._idle.values() if c), key=lambda c: c[0].idle_since, default=None)
        if conns is None:
            return False
        conns.pop(0).close()
        return True

    def _put(self, conn: _Connection) -> None:
        if self._slots and self.limit and self._open >= self.limit:  # a waiter needs a connection elsewhere, maybe
            conn.close()
            self._forget()
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.origin, []).append(conn)

    def _forget(self) -> None:
        """A connection is gone: its slot goes to the first post waiting for one, else back to the pool."""
        while self._slots:
            slot = self._slots.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot passes on: _open stays
                return
        self._open -= 1

    def close(self) -> None:
        """Close the idle connections (those in use close as their answers end)."""
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()
