"""The router's HTTP/1.1 client (radixserve/router/http_client.py) against a small in-process server:
keep-alive reuse, chunked streaming as it arrives, a connection the server closed (idle, or as a
request was sent) not reused, refused connections, the deadline, and a response closed before its
end closing its connection. Each runs on asyncio's loop and on uvloop's (the router's)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from radixserve.bench.local_procs import free_port
from radixserve.router.http_client import ConnectFailed, Disconnected, HTTPClient, split_url

LOOPS = ["asyncio"]
try:
    import uvloop

    LOOPS.append("uvloop")
except ImportError:  # pragma: no cover
    uvloop = None


@pytest.fixture(params=LOOPS)
def run(request) -> Callable[[Awaitable], object]:
    if request.param == "uvloop":
        return lambda coro: uvloop.run(coro)
    return asyncio.run


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    reader: asyncio.StreamReader  # for a handler waiting for the client to leave: read() returns b""


@dataclass
class Server:
    """One request at a time per connection; `handle` answers it by writing to the stream (or not)."""

    handle: Callable[[Request, asyncio.StreamWriter, Server], Awaitable[None]]
    connections: int = 0
    closed: int = 0  # connections that ended (the client closed them, or the server did)
    requests: list[Request] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ")
                headers = dict(line.split(": ", 1) for line in lines[1:] if line)
                headers = {k.lower(): v for k, v in headers.items()}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                req = Request(method, target, headers, body, reader)
                self.requests.append(req)
                await self.handle(req, writer, self)
                if writer.is_closing():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.closed += 1
            self.ended.set()

    async def wait_closed(self, n: int, timeout: float = 2.0) -> None:
        async def until() -> None:
            while self.closed < n:
                self.ended.clear()
                await self.ended.wait()
        await asyncio.wait_for(until(), timeout)

    async def stop(self) -> None:
        self.server.close()


def answer(body: bytes, status: int = 200, extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status} OK\r\ncontent-type: application/json\r\nx-worker: w1\r\n{extra}"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


async def echo(req: Request, writer: asyncio.StreamWriter, server: Server) -> None:
    writer.write(answer(b'{"echo": "' + req.body + b'", "target": "' + req.target.encode() + b'"}'))


def test_split_url() -> None:
    origin, target = split_url("http://h:8080/generate?x=1")
    assert (origin.host, origin.port, origin.ssl, origin.authority, target) == ("h", 8080, False, "h:8080",
                                                                                "/generate?x=1")
    assert split_url("https://h")[0].port == 443 and split_url("https://h")[1] == "/"


def test_keep_alive_reuses_one_connection(run) -> None:
    async def scenario() -> None:
        server = Server(echo)
        url = await server.start()
        client = HTTPClient()
        for i in range(3):
            r = await client.request("POST", f"{url}/generate", f"hi{i}".encode(), {"x-request-id": "r1"}, 5)
            assert r.status == 200 and r.headers["x-worker"] == "w1"
            assert r.headers["content-type"] == "application/json"
            assert await r.read() == f'{{"echo": "hi{i}", "target": "/generate"}}'.encode()
            r.close()
        assert server.connections == 1 and server.closed == 0
        req = server.requests[0]
        assert req.method == "POST" and req.headers["x-request-id"] == "r1" and req.headers["host"] == url[7:]
        assert await client.fetch("GET", f"{url}/info") == (200, b'{"echo": "", "target": "/info"}')
        assert server.connections == 1
        await client.close()
        await server.wait_closed(1)
        await server.stop()
    run(scenario())


def test_concurrent_requests_open_a_connection_each_then_reuse_them(run) -> None:
    async def slow_echo(req: Request, writer: asyncio.StreamWriter, server: Server) -> None:
        await asyncio.sleep(0.02)
        await echo(req, writer, server)

    async def scenario() -> None:
        server = Server(slow_echo)
        url = await server.start()
        client = HTTPClient()
        for _ in range(2):
            results = await asyncio.gather(*(client.fetch("POST", f"{url}/g", b"x", None, 5) for _ in range(8)))
            assert all(status == 200 for status, _ in results)
        assert server.connections == 8
        await client.close()
        await server.stop()
    run(scenario())


def test_chunked_stream_arrives_chunk_by_chunk(run) -> None:
    async def scenario() -> None:
        release = asyncio.Event()

        async def stream(req: Request, writer: asyncio.StreamWriter, server: Server) -> None:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(b"9\r\ndata: one\r\n")
            await writer.drain()
            await release.wait()  # the client must have the first chunk before the rest is sent
            for event in (b"data: two\n\n", b"data: [DONE]\n\n"):
                writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            writer.write(b"0\r\n\r\n")

        server = Server(stream)
        url = await server.start()
        client = HTTPClient()
        r = await client.request("POST", f"{url}/generate", b"{}", timeout=5)
        assert r.status == 200 and r.headers["content-type"] == "text/event-stream"
        assert await r.next_chunk() == b"data: one"
        release.set()
        rest = b"".join([chunk async for chunk in r])
        assert rest == b"data: two\n\ndata: [DONE]\n\n"
        assert await r.next_chunk() == b""
        r.close()
        release.clear()
        r = await client.request("POST", f"{url}/generate", b"{}", timeout=5)  # the same connection again
        release.set()
        assert await r.read() == b"data: onedata: two\n\ndata: [DONE]\n\n"
        assert server.connections == 1
        await client.close()
        await server.stop()
    run(scenario())


def test_server_closing_an_idle_connection_is_not_reused(run) -> None:
    async def close_after(req: Request, writer: asyncio.StreamWriter, server: Server) -> None:
        await echo(req, writer, server)
        await writer.drain()
        writer.close()  # as a keep-alive timeout would

    async def scenario() -> None:
        server = Server(close_after)
        url = await server.start()
        client = HTTPClient()
        assert (await client.fetch("POST", f"{url}/g", b"a", timeout=5))[0] == 200
        await server.wait_closed(1)
        await asyncio.sleep(0.05)  # the client sees the close
        assert (await client.fetch("POST", f"{url}/g", b"b", timeout=5))[0] == 200
        assert server.connections == 2 and len(server.requests) == 2
        await client.close()
        await server.stop()
    run(scenario())


def test_request_on_a_connection_closed_as_it_was_sent_is_retried_once(run) -> None:
    """The keep-alive race: the server closes an idle connection as a request goes out on it."""
    async def second_is_dropped(req: Request, writer: asyncio.StreamWriter, server: Server) -> None:
        if len(server.requests) == 2:
            writer.close()  # no answer
            return
        await echo(req, writer, server)

    async def scenario() -> None:
        server = Server(second_is_dropped)
        url = await server.start()
        client = HTTPClient()
        assert (await client.fetch("POST", f"{url}/g", b"a", timeout=5))[0] == 200
        status, body = await client.fetch("POST", f"{url}/g", b"b", timeout=5)
        assert status == 200 and b'"echo": "b"' in body
        assert server.connections == 2 and len(server.requests) == 3
        await client.close()
        await server.stop()
    run(scenario())


def test_new_connection_closed_without_an_answer_is_an_error_not_a_retry(run) -> None:
    async def drop(req: Request, writer: asyncio.StreamWriter, server: Server) -> None:
        writer.close()

    async def scenario() -> None:
        server = Server(drop)
        url = await server.start()
        client = HTTPClient()
        with pytest.raises(Disconnected):
            await client.request("POST", f"{url}/g", b"a", timeout=5)
        assert len(server.requests) == 1
        await client.close()
        await server.stop()
    run(scenario())


def test_answer_cut_mid_body_is_disconnected(run) -> None:
    async def cut(req: Request, writer: asyncio.StreamWriter, server: Server) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        server = Server(cut)
        url = await server.start()
        client = HTTPClient()
        r = await client.request("POST", f"{url}/g", b"a", timeout=5)
        with pytest.raises(Disconnected):
            await r.read()
        r.close()
        assert not client.idle.get(split_url(url)[0])
        await client.close()
        await server.stop()
    run(scenario())


def test_refused_connection_is_connect_failed(run) -> None:
    async def scenario() -> None:
        client = HTTPClient()
        with pytest.raises(ConnectFailed) as e:
            await client.request("GET", f"http://127.0.0.1:{free_port()}/health", timeout=5)
        assert isinstance(e.value.__cause__, ConnectionRefusedError)
        await client.close()
    run(scenario())


def test_deadline_times_out_and_closes_the_connection(run) -> None:
    async def hang(req: Request, writer: asyncio.StreamWriter, server: Server) -> None:
        if req.target == "/slow-body":
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await req.reader.read()  # until the client leaves

    async def scenario() -> None:
        server = Server(hang)
        url = await server.start()
        client = HTTPClient()
        with pytest.raises(asyncio.TimeoutError):
            await client.request("POST", f"{url}/slow", b"a", timeout=0.1)
        await server.wait_closed(1)  # the server sees the client leave
        r = await client.request("POST", f"{url}/slow-body", b"a", timeout=0.2)  # the deadline covers the body
        assert await r.next_chunk() == b"abc"
        with pytest.raises(asyncio.TimeoutError):
            await r.next_chunk()
        r.close()
        await server.wait_closed(2)
        assert server.connections == 2 and not client.idle.get(split_url(url)[0])
        await client.close()
        await server.stop()
    run(scenario())


def test_closing_a_response_before_its_end_closes_its_connection(run) -> None:
    async def endless(req: Request, writer: asyncio.StreamWriter, server: Server) -> None:
        if req.target == "/short":
            await echo(req, writer, server)
            return
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while not writer.is_closing():
            writer.write(b"6\r\ndata: \r\n")
            await writer.drain()
            await asyncio.sleep(0.005)

    async def scenario() -> None:
        server = Server(endless)
        url = await server.start()
        client = HTTPClient()
        r = await client.request("POST", f"{url}/stream", b"a", timeout=5)
        assert await r.next_chunk()
        r.close()
        await server.wait_closed(1)
        assert not client.idle.get(split_url(url)[0])
        assert (await client.fetch("POST", f"{url}/short", b"b", timeout=5))[0] == 200
        assert server.connections == 2
        await client.close()
        await server.stop()
    run(scenario())


def test_cancelled_request_closes_its_connection(run) -> None:
    async def never(req: Request, writer: asyncio.StreamWriter, server: Server) -> None:
        await req.reader.read()  # until the client leaves

    async def scenario() -> None:
        server = Server(never)
        url = await server.start()
        client = HTTPClient()
        task = asyncio.ensure_future(client.request("POST", f"{url}/g", b"a", timeout=5))
        while not server.requests:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await server.wait_closed(1)
        assert not client.idle.get(split_url(url)[0])
        await client.close()
        await server.stop()
    run(scenario())


def test_connection_close_and_body_until_eof(run) -> None:
    async def old_style(req: Request, writer: asyncio.StreamWriter, server: Server) -> None:
        if req.target == "/close":
            writer.write(answer(b"bye", extra="connection: close\r\n"))
        else:  # no length: the body ends with the connection
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        server = Server(old_style)
        url = await server.start()
        client = HTTPClient()
        assert await client.fetch("GET", f"{url}/close", timeout=5) == (200, b"bye")
        assert not client.idle.get(split_url(url)[0])
        assert await client.fetch("GET", f"{url}/eof", timeout=5) == (200, b"until the end")
        assert server.connections == 2
        await client.close()
        await server.stop()
    run(scenario())


def test_interim_100_continue_is_skipped(run) -> None:
    async def continue_first(req: Request, writer: asyncio.StreamWriter, server: Server) -> None:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await echo(req, writer, server)

    async def scenario() -> None:
        server = Server(continue_first)
        url = await server.start()
        client = HTTPClient()
        assert await client.fetch("POST", f"{url}/g", b"x", timeout=5) == (200, b'{"echo": "x", "target": "/g"}')
        assert (await client.fetch("POST", f"{url}/g", b"y", timeout=5))[0] == 200
        assert server.connections == 1
        await client.close()
        await server.stop()
    run(scenario())
