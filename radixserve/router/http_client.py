"""The router's HTTP/1.1 client to its workers, built for its hot path: asyncio Protocol connections
kept alive in a pool per worker, responses parsed by httptools, a request written as one buffer.

    client = HTTPClient()
    resp = await client.request("POST", url, body, headers, timeout=5.0)
    body = await resp.read()            # or: async for chunk in resp: ...
    resp.close()                        # before its end: closes the connection (aborts it on the worker)

Errors: ConnectFailed (no connection: the worker is down), Disconnected (the worker closed it before
its answer ended), BadResponse (not HTTP), asyncio.TimeoutError past `timeout` (which covers the
whole exchange, body included). A connection goes back to the pool only once its answer has fully
arrived and the worker keeps it alive."""

from __future__ import annotations

import asyncio
from functools import lru_cache
from typing import NamedTuple
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 256 * 1024  # body bytes buffered, unread, past which a connection stops reading
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class UpstreamError(Exception):
    """A worker could not be reached, or broke off or garbled its answer."""


class ConnectFailed(UpstreamError):
    """No connection could be made (refused, unreachable, unresolvable)."""


class Disconnected(UpstreamError):
    """The connection closed before the answer ended."""


class NoAnswer(Disconnected):
    """The worker closed the connection before any byte of its answer."""


class BadResponse(UpstreamError):
    """The worker's answer is not valid HTTP/1.1."""


class Origin(NamedTuple):
    host: str
    port: int
    ssl: bool
    authority: str  # the Host header


@lru_cache(maxsize=4096)
def split_url(url: str) -> tuple[Origin, str]:
    """(where to connect, the request target) of an absolute http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    ssl = parts.scheme == "https"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Origin(parts.hostname, parts.port or (443 if ssl else 80), ssl, parts.netloc), target


def encode_request(method: str, target: str, authority: str, headers: dict[str, str] | None, body: bytes) -> bytes:
    head = [f"{method} {target} HTTP/1.1\r\nHost: {authority}\r\n"]
    if headers:
        head.extend(f"{k}: {v}\r\n" for k, v in headers.items())
    if body or method in BODY_METHODS:
        head.append(f"Content-Length: {len(body)}\r\n")
    head.append("\r\n")
    return "".join(head).encode("latin-1") + body


class Response:
    """One answer: status and headers once it is returned; its body as it arrives."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.status = 0  # set when the headers are in
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self._headers: dict[str, str] | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.done = False  # the whole body arrived
        self.error: BaseException | None = None
        self.started = False  # a byte of it arrived
        self.reading_all = False  # read() waits for the end: no pausing the connection
        self.waiter: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None

    @property
    def headers(self) -> dict[str, str]:
        """Lower-cased names; a repeated header keeps its last value."""
        if self._headers is None:
            self._headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.raw_headers}
        return self._headers

    async def read(self) -> bytes:
        """The rest of the body, once all of it arrived."""
        self.reading_all = True
        self.conn.resume()
        while not self.done:
            if self.error is not None:
                raise self.error
            await self.wait()
        body = b"".join(self.chunks)
        self.chunks.clear()
        return body

    async def next_chunk(self) -> bytes:
        """What arrived since the last call (waiting for something); b"" at the end."""
        while not self.chunks:
            if self.done:
                return b""
            if self.error is not None:
                raise self.error
            await self.wait()
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        self.conn.resume()
        return data

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.next_chunk()
        if not chunk:
            raise StopAsyncIteration
        return chunk

    def close(self) -> None:
        """Done with it. Before its end this closes the connection (the worker sees the client leave)."""
        if not self.done:
            self.fail(Disconnected("the response was closed before its end"))
            self.conn.abort()

    # ---- fed by the connection ----
    async def wait(self) -> None:
        if self.waiter is None or self.waiter.done():
            self.waiter = self.conn.loop.create_future()
        await self.waiter

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def finish(self) -> None:
        if self.done or self.error is not None:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        self.wake()

    def fail(self, error: BaseException) -> None:
        if self.done or self.error is not None:
            return
        self.error = error
        if self.timer is not None:
            self.timer.cancel()
        self.wake()

    def time_out(self) -> None:
        self.fail(asyncio.TimeoutError())
        self.conn.abort()


class Connection(asyncio.Protocol):
    """One keep-alive TCP connection to a worker, carrying one exchange at a time."""

    def __init__(self, client: HTTPClient, origin: Origin, loop: asyncio.AbstractEventLoop) -> None:
        self.client, self.origin, self.loop = client, origin, loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.paused = False

    async def exchange(self, data: bytes, deadline: float | None) -> Response:
        """Send a request; the response once its status and headers are in."""
        r = self.response = Response(self)
        if deadline is not None:
            r.timer = self.loop.call_at(deadline, r.time_out)
        self.transport.write(data)
        try:
            while not r.status:
                if r.error is not None:
                    raise r.error
                await r.wait()
        except BaseException:  # failed or cancelled: a half-done exchange leaves with its connection
            r.close()
            raise
        return r

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if not self.closed:
                self.transport.resume_reading()

    # ---- asyncio.Protocol ----
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # the worker talking out of turn
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if self.response is not None:
                self.response.fail(BadResponse(f"bad HTTP from {self.origin.authority}: {e}"))
            self.abort()

    def eof_received(self) -> bool:
        self.closed = True  # not to be taken from the pool meanwhile
        return False  # let the transport close: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client.forget(self)
        r, self.response = self.response, None
        if r is None:
            return
        if r.status and r.error is None and not any(k.lower() in (b"content-length", b"transfer-encoding")
                                                    for k, _ in r.raw_headers):
            r.finish()  # a body delimited by the connection's end
        elif r.started:
            r.fail(Disconnected(f"{self.origin.authority} closed the connection mid-answer"
                                + (f": {exc}" if exc else "")))
        else:
            r.fail(NoAnswer(f"{self.origin.authority} closed the connection before answering"
                            + (f": {exc}" if exc else "")))

    # ---- httptools callbacks ----
    def on_message_begin(self) -> None:
        self.response.started = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        r = self.response
        if status < 200:  # an interim answer (100 Continue): the real one follows
            r.raw_headers.clear()
            return
        r.status = status
        r.wake()

    def on_body(self, body: bytes) -> None:
        r = self.response
        r.chunks.append(body)
        r.buffered += len(body)
        if r.buffered > HIGH_WATER and not r.reading_all and not self.paused and not self.closed:
            self.paused = True  # a slow reader: let TCP push back on the worker
            self.transport.pause_reading()
        r.wake()

    def on_message_complete(self) -> None:
        r = self.response
        if not r.status:  # the end of an interim answer
            return
        self.response = None
        r.finish()
        if self.parser.should_keep_alive() and not self.closed:
            self.resume()
            self.client.give_back(self)
        else:
            self.abort()


class HTTPClient:
    """Keep-alive connections per worker (no limit on their number: admission bounds it)."""

    def __init__(self) -> None:
        self.idle: dict[Origin, list[Connection]] = {}
        self.closing = False

    async def request(self, method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None,
                      timeout: float | None = None) -> Response:
        """The response once its status and headers are in; `timeout` (s) covers its body too."""
        origin, target = split_url(url)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        data = encode_request(method, target, origin.authority, headers, body)
        conn = self.take_idle(origin)
        if conn is not None:
            try:
                return await conn.exchange(data, deadline)
            except NoAnswer:
                pass  # the worker closed it while idle (its keep-alive timeout): once more on a new one
        conn = await self.connect(origin, deadline, loop)
        return await conn.exchange(data, deadline)

    async def fetch(self, method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None,
                    timeout: float | None = None) -> tuple[int, bytes]:
        """(status, whole body) of one exchange."""
        r = await self.request(method, url, body, headers, timeout)
        try:
            return r.status, await r.read()
        finally:
            r.close()

    async def connect(self, origin: Origin, deadline: float | None, loop: asyncio.AbstractEventLoop) -> Connection:
        conn = Connection(self, origin, loop)
        made = loop.create_connection(lambda: conn, origin.host, origin.port, ssl=origin.ssl or None)
        try:
            await (made if deadline is None else asyncio.wait_for(made, max(0.0, deadline - loop.time())))
        except (OSError, asyncio.TimeoutError) as e:
            conn.abort()
            if isinstance(e, asyncio.TimeoutError) and getattr(e, "errno", None) is None:
                raise  # the deadline (a kernel's connect timeout has an errno: that is a failure to connect)
            raise ConnectFailed(f"cannot connect to {origin.authority}: {e}") from e
        except BaseException:  # cancelled: a connection made meanwhile is closed
            conn.abort()
            raise
        return conn

    def take_idle(self, origin: Origin) -> Connection | None:
        conns = self.idle.get(origin)
        while conns:
            conn = conns.pop()  # the most recently used: the least likely to have been closed
            if not conn.closed:
                return conn
        return None

    def give_back(self, conn: Connection) -> None:
        if self.closing:
            conn.abort()
        else:
            self.idle.setdefault(conn.origin, []).append(conn)

    def forget(self, conn: Connection) -> None:
        conns = self.idle.get(conn.origin)
        if conns and conn in conns:
            conns.remove(conn)

    async def close(self) -> None:
        """Close the idle connections; those in use close as their answers end."""
        self.closing = True
        conns = [c for cs in self.idle.values() for c in cs]
        self.idle.clear()
        for conn in conns:
            conn.abort()
