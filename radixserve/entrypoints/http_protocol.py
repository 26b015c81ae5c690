"""uvicorn's httptools protocol with what a server facing the open network needs, at the connection
level where an ASGI app cannot act:

- a deadline for each request's headers: a connection that sends nothing, or trickles its headers,
  is answered 408 and closed instead of held forever (the body's deadline is GateMiddleware's);
- a limit on open connections: one more is answered 503 and closed;
- HTTP/1.0 clients get a streamed reply without chunked encoding (HTTP/1.1 only), its end marked
  by closing the connection, as HTTP/1.0 frames a body of unknown length.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from radixserve.entrypoints.errors import error_body

logger = logging.getLogger("radixserve.http")


def error_bytes(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 error response with the OpenAI envelope, closing the connection."""
    body = orjson.dumps(error_body(status, message))
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


class CloseDelimitedCycle(RequestResponseCycle):
    """One request of an HTTP/1.0 client: a response without Content-Length is sent as it comes and
    ends when the connection closes (HTTP/1.0 keeps no connection alive, so it always closes)."""

    close_delimited = False

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            names = {name.lower() for name, _ in message.get("headers", [])}
            if b"content-length" not in names and b"transfer-encoding" not in names:
                # uvicorn would pick chunked encoding here: send the body as it is instead
                self.close_delimited = True
                self.chunked_encoding = False
                self.expected_content_length = 1 << 62
                self.keep_alive = False
        elif self.close_delimited and message["type"] == "http.response.body" and not message.get("more_body"):
            # this is the end, whatever its length: uvicorn checks the length it counted down
            self.expected_content_length = len(message.get("body", b""))
        await super().send(message)


class GuardedProtocol(HttpToolsProtocol):
    """Configured by guarded_protocol(); uvicorn makes one per connection."""

    header_timeout: float = 30.0
    max_connections: int = 4096

    _header_timer: asyncio.TimerHandle | None = None
    _refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            logger.warning("connection refused: %d connections open (--http-max-connections)",
                           len(self.connections) - 1)
            self._refused = True
            transport.write(error_bytes(503, "Service Unavailable", "too many open connections; retry later"))
            # closing with the client's request unread would reset the connection and lose the answer:
            # end our side, read and drop what comes, and close shortly
            if transport.can_write_eof():
                transport.write_eof()
            self.loop.call_later(1.0, transport.close)
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()  # the first byte of a later request on a kept-alive connection

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        super().on_headers_complete()
        if self.scope.get("http_version") == "1.0" and self.cycle is not None:
            self.cycle.__class__ = CloseDelimitedCycle  # its ASGI task has not run yet

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # an earlier request of this connection is still being answered: its turn first
            self._arm_header_timer()
            return
        logger.info("error 408: no complete request headers within %.0f s; connection closed", self.header_timeout)
        self.transport.write(error_bytes(
            408, "Request Timeout", f"request headers not received within {self.header_timeout:g} seconds"))
        self.transport.close()


def guarded_protocol(header_timeout: float, max_connections: int) -> type[GuardedProtocol]:
    """The protocol class to give uvicorn (Config(http=...)) for these limits."""
    return type("GuardedProtocol", (GuardedProtocol,),
                {"header_timeout": header_timeout, "max_connections": max_connections})
