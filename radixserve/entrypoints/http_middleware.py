"""ASGI middleware in front of every route: readiness and draining (503), API key (401), body size
(413) and body deadline (408), and the count of requests in flight that graceful shutdown waits for."""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import TYPE_CHECKING, Any

import orjson
from starlette.exceptions import HTTPException

from radixserve.entrypoints.errors import error_body

if TYPE_CHECKING:
    from radixserve.entrypoints.http_state import ServerState

logger = logging.getLogger("radixserve.http")
OPEN_PATHS = {"/health", "/metrics"}  # answered while starting or draining
# no API key (as SGLang): liveness probes and Prometheus scrapers carry none
KEYLESS_PREFIXES = ("/health", "/metrics")


class BodyError(HTTPException):
    """Raised from receive() while a body arrives: one past the size limit (sent chunked, without a
    Content-Length), or one too slow. An HTTPException, so that FastAPI's body parsing passes it on
    (any other exception there becomes 400 "There was an error parsing the body") to the app's
    handler. The connection closes after the answer: the rest of the body is not read."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message, headers={"Connection": "close"})


def too_large_message(limit: int) -> str:
    # "Payload Too Large": HTTP's own name for 413, which clients (and SGLang's tests) look for
    return f"Payload Too Large: the request body is larger than {limit} bytes (--max-request-body-size)"


class BodyTooLarge(BodyError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit))


class BodyTooSlow(BodyError):
    def __init__(self, timeout: float) -> None:
        super().__init__(408, f"request body not received within {timeout:g} seconds of its headers")


async def send_error(send: Any, status: int, message: str, close: bool = False, quiet: bool = False) -> None:
    logger.log(logging.DEBUG if quiet else logging.INFO, "error %d: %s", status, message)
    body = orjson.dumps(error_body(status, message))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GateMiddleware:
    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        st = self.state
        if path not in OPEN_PATHS:
            if st.draining:
                return await send_error(send, 503, "the server is shutting down")
            if not st.ready:
                # clients poll while the model loads: not worth a log line each
                return await send_error(send, 503, "the server is starting", quiet=True)
            if st.api_key is not None and not path.startswith(KEYLESS_PREFIXES) and not self._authorized(scope):
                return await send_error(send, 401, "missing or invalid API key (Authorization: Bearer ...)")
        limit = st.max_body_size
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await send_error(send, 413, too_large_message(limit))

        received = 0
        started = False
        body_done = False
        timeout = st.args.http_body_timeout
        deadline = asyncio.get_running_loop().time() + timeout

        async def limited_receive() -> dict:
            nonlocal received, body_done
            if body_done:  # later calls wait for the client to leave: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                raise BodyTooSlow(timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        counted = path not in OPEN_PATHS
        if counted:
            st.inflight += 1
        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyError as e:  # raised where no handler of the app saw it
            if not started:
                await send_error(send, e.status_code, e.detail, close=True)
        finally:
            if counted:
                st.inflight -= 1
        return None

    def _authorized(self, scope: dict) -> bool:
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                expected = f"Bearer {self.state.api_key}".encode()
                return hmac.compare_digest(value, expected)
        return False
