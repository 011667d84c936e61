"""router.upstream against real servers on 127.0.0.1: aiohttp ones for well-formed answers, raw asyncio ones for
answers that break, stall or are not HTTP."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from aiohttp import web

from router.upstream import ConnectError, ReadTimeout, TransportError, UpstreamPool

pytestmark = pytest.mark.asyncio(loop_scope="function")


@contextlib.asynccontextmanager
async def aiohttp_server(app: web.Application):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_server(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


@contextlib.asynccontextmanager
async def pool_for(server, **kwargs):
    """A server (aiohttp_server or raw_server) and a pool in front of it: yields (url, pool), closes the pool."""
    async with server as url:
        pool = UpstreamPool(**kwargs)
        try:
            yield url, pool
        finally:
            pool.close()


def echo_app(peers: list, disconnects: list | None = None) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))
        body = await request.read()
        return web.Response(body=b"got:" + body, headers={"X-Seen": request.headers.get("X-Tag", "")},
                            content_type="application/json")

    async def stream(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        try:
            for i in range(int(request.query.get("n", "3"))):
                await out.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(float(request.query.get("gap", "0.05")))
        except asyncio.CancelledError:
            if disconnects is not None:
                disconnects.append(True)
            raise
        await out.write_eof()
        return out

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=bytes(range(256)) * 8192)  # 2 MiB, past the pool's high-water mark

    app = web.Application(handler_args={"handler_cancellation": True})
    app.router.add_post("/echo", echo)
    app.router.add_post("/base/echo", echo)
    app.router.add_post("/stream", stream)
    app.router.add_post("/big", big)
    return app


async def test_answers_and_reuses_the_connection():
    peers: list = []
    async with pool_for(aiohttp_server(echo_app(peers))) as (url, pool):
        for i in range(3):
            r = await pool.post(url, "/echo", b'{"i":%d}' % i, {"Content-Type": "application/json", "X-Tag": str(i)})
            assert r.status == 200 and r.headers["content-type"] == "application/json"
            assert r.headers["x-seen"] == str(i)
            assert await r.read() == b'got:{"i":%d}' % i and r.at_eof()
            r.release()
        assert len(set(peers)) == 1  # one keep-alive connection served all three
        r = await pool.post(url + "/base", "/echo", b"x", {})  # a worker URL with a path prefix
        assert await r.read() == b"got:x"
        r.release()


async def test_a_stream_arrives_chunk_by_chunk():
    async with pool_for(aiohttp_server(echo_app([]))) as (url, pool):
        r = await pool.post(url, "/stream?n=3&gap=0.3", b"{}", {})
        assert r.headers["content-type"].startswith("text/event-stream")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        first = await r.readany()
        assert first == b"data: 0\n\n" and loop.time() - t0 < 0.25  # before the server wrote the rest
        rest = b""
        while chunk := await r.readany():
            rest += chunk
        assert rest == b"data: 1\n\ndata: 2\n\n" and r.at_eof()
        r.release()


async def test_a_large_answer_is_read_whole_through_flow_control():
    async with pool_for(aiohttp_server(echo_app([]))) as (url, pool):
        r = await pool.post(url, "/big", b"", {})
        await asyncio.sleep(0.2)  # let it all arrive unread: reading pauses past the high-water mark
        assert r._paused
        assert await r.read() == bytes(range(256)) * 8192
        r.release()


async def test_closing_an_unfinished_answer_disconnects_the_worker():
    disconnects: list = []
    async with pool_for(aiohttp_server(echo_app([], disconnects))) as (url, pool):
        r = await pool.post(url, "/stream?n=100&gap=0.05", b"{}", {})
        assert await r.readany()
        r.close()
        for _ in range(40):
            if disconnects:
                break
            await asyncio.sleep(0.05)
        assert disconnects == [True]


async def test_an_unreachable_worker_is_a_connect_error():
    async with raw_server(lambda r, w: None) as url:
        pass  # closed again: nothing listens on that port now
    pool = UpstreamPool(connect_timeout=1)
    with pytest.raises(ConnectError):
        await pool.post(url, "/echo", b"{}", {})
    assert pool._open == 0


async def test_a_worker_that_drops_the_connection_is_a_transport_error():
    async def drop(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()

    async with pool_for(raw_server(drop)) as (url, pool):
        r = await pool.post(url, "/x", b"{}", {})
        assert r.status == 200
        with pytest.raises(TransportError):
            await r.read()
        r.release()
        with pytest.raises(TransportError):  # closes before any answer
            async with raw_server(lambda r, w: w.close()) as url2:
                await pool.post(url2, "/x", b"{}", {})


async def test_a_worker_that_answers_something_else_is_a_transport_error():
    async def garbage(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()

    async with pool_for(raw_server(garbage)) as (url, pool):
        with pytest.raises(TransportError):
            await pool.post(url, "/x", b"{}", {})


async def test_a_silent_worker_times_out():
    async def silent(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(5)

    async with pool_for(raw_server(silent), read_timeout=0.3) as (url, pool):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ReadTimeout):
            await pool.post(url, "/x", b"{}", {})
        assert 0.25 < loop.time() - t0 < 2


async def test_the_connection_limit_queues_posts_and_survives_cancelled_waiters():
    peers: list = []
    async with pool_for(aiohttp_server(echo_app(peers)), limit=1) as (url, pool):
        first = await pool.post(url, "/stream?n=2&gap=0.2", b"{}", {})
        second = asyncio.create_task(pool.post(url, "/echo", b"2", {}))
        cancelled = asyncio.create_task(pool.post(url, "/echo", b"3", {}))
        await asyncio.sleep(0.1)
        assert not second.done() and pool._open == 1  # waiting for the one connection
        cancelled.cancel()
        await first.read()
        first.release()
        r = await second
        assert await r.read() == b"got:2"
        r.release()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        # a cancelled waiter leaves no slot behind: more requests still go through, on one connection
        for i in range(3):
            r = await asyncio.wait_for(pool.post(url, "/echo", b"%d" % i, {}), 5)
            assert await r.read() == b"got:%d" % i
            r.release()
        assert pool._open == 1


async def test_a_waiter_cancelled_as_the_connection_frees_stays_a_cancel():
    """At the limit, a waiting post is cancelled (its client left, a time limit, shutdown's cut) and, in the same
    loop turn, the connection it waits for is closed: the waiter sees its cancel, not a ValueError (a 500)."""
    async with pool_for(aiohttp_server(echo_app([])), limit=1) as (url, pool):
        first = await pool.post(url, "/stream?n=50&gap=0.1", b"{}", {})
        waiter = asyncio.create_task(pool.post(url, "/echo", b"2", {}))
        await asyncio.sleep(0.05)
        assert len(pool._slots) == 1
        waiter.cancel()
        first.close()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert not pool._slots
        r = await asyncio.wait_for(pool.post(url, "/echo", b"3", {}), 5)  # the slot went back to the pool
        assert await r.read() == b"got:3"
        r.release()


async def test_at_the_limit_an_idle_connection_to_another_worker_makes_room():
    async with aiohttp_server(echo_app([])) as a, aiohttp_server(echo_app([])) as b:
        pool = UpstreamPool(limit=1)
        r = await pool.post(a, "/echo", b"a", {})
        await r.read()
        r.release()  # idle, to a
        r = await asyncio.wait_for(pool.post(b, "/echo", b"b", {}), 5)
        assert await r.read() == b"got:b"
        r.release()
        assert pool._open == 1
        pool.close()


async def test_a_body_without_a_length_ends_with_the_connection():
    async def http10(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"ok\":")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"true}")
        await writer.drain()
        writer.close()

    async with pool_for(raw_server(http10)) as (url, pool):
        r = await pool.post(url, "/x", b"{}", {})
        assert await r.read() == b'{"ok":true}' and r.at_eof()
        r.release()
        assert pool._open == 0  # not reusable: closed, its slot given back


async def test_a_body_without_a_length_cut_by_the_read_timeout_is_not_complete():
    async def stall(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(5)

    async with pool_for(raw_server(stall), read_timeout=0.3) as (url, pool):
        r = await pool.post(url, "/x", b"{}", {})
        with pytest.raises(ReadTimeout):
            await r.read()
        await asyncio.sleep(0.1)  # the connection's close has landed: still an error, not a complete body
        assert not r.at_eof()
        with pytest.raises(ReadTimeout):
            await r.readany()
        r.release()


async def test_a_header_value_cannot_inject_lines():
    async with pool_for(aiohttp_server(echo_app([]))) as (url, pool):
        with pytest.raises(ValueError):
            await pool.post(url, "/echo", b"{}", {"X-Tag": "a\r\nX-Evil: 1"})
        r = await pool.post(url, "/echo", b"ok", {"X-Tag": "fine"})
        assert r.headers["x-seen"] == "fine" and await r.read() == b"got:ok"
        r.release()
