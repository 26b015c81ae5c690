"""The serving routes (/generate, /v1/chat/completions, /v1/completions) as a bare ASGI handler: the
router's hot path, kept free of framework layers. Per request: API key, request id, payload limit,
JSON body, admission, the routing (regular or PD) under --request-timeout-secs, and the answer, a
body or a stream passed through chunk by chunk. A client that leaves cancels the handler, which
closes the connections to the workers and so aborts the request there."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import orjson

from radixserve.router.admission import Rejected
from radixserve.router.context import RouterContext
from radixserve.router.dispatch import Deadline, route_regular
from radixserve.router.pd import route_pd
from radixserve.router.request_info import describe
from radixserve.router.upstream import DROPPED_HEADERS, Answer, error_answer

logger = logging.getLogger("radixserve.router")

SERVING_PATHS = frozenset({"/generate", "/v1/chat/completions", "/v1/completions"})


class ClientGone(Exception):
    pass


async def read_body(receive, limit: int, declared: str | None) -> bytes:
    """The body, or Rejected(413) past `limit` (by its length header, or as it arrives)."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Rejected(413, f"request body of {declared} bytes is over --max-payload-size ({limit})")
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Rejected(413, f"request body is over --max-payload-size ({limit} bytes)")
        parts.append(chunk)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


async def send_answer(send, answer: Answer) -> None:
    headers = [(b"content-type", answer.media_type.encode("latin-1"))]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()]
    if answer.stream is None:
        headers.append((b"content-length", str(len(answer.body)).encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})
        return
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    async for chunk in answer.stream:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


class ServingHandler:
    def __init__(self, ctx: RouterContext) -> None:
        self.ctx = ctx
        self.id_headers = [h.encode("latin-1") for h in ctx.args.request_id_headers]
        self.key = f"Bearer {ctx.args.api_key}" if ctx.args.api_key else None
        self.counted: dict[tuple[str, int], Any] = {}  # (path, status) -> its counter
        self.timed = {p: ctx.metrics.latency.labels(p) for p in SERVING_PATHS}

    async def __call__(self, scope, receive, send) -> None:
        path = scope["path"]
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = next((headers[h] for h in self.ctx.args.request_id_headers if headers.get(h)), None) \
            or uuid.uuid4().hex
        answer = None
        try:
            answer = await self.answer(path, headers, receive, request_id)
        except Rejected as e:
            if e.status in (408, 429):
                self.ctx.metrics.rejected.labels("queue_full" if e.status == 429 else "queue_timeout").inc()
            answer = error_answer(e.status, e.message, request_id)
        except ClientGone:
            answer = None
        except Exception:  # the router's own bug: still an answer in the envelope, with its id
            logger.exception("request %s on %s failed in the router", request_id, path)
            answer = error_answer(500, "internal error in the router", request_id)
        status = answer.status if answer is not None else 499
        counter = self.counted.get((path, status))
        if counter is None:
            counter = self.counted[(path, status)] = self.ctx.metrics.requests.labels(path, str(status))
        counter.inc()
        self.timed[path].observe(time.perf_counter() - started)
        if answer is not None:
            await self.respond(answer, receive, send)

    async def answer(self, path: str, headers: dict[str, str], receive, request_id: str) -> Answer:
        ctx = self.ctx
        if self.key is not None and headers.get("authorization") != self.key and \
                headers.get("x-api-key") != ctx.args.api_key:
            return error_answer(401, "missing or wrong API key (Authorization: Bearer KEY)", request_id)
        if ctx.draining:
            raise Rejected(503, "the router is shutting down")
        raw = await read_body(receive, ctx.args.max_payload_size, headers.get("content-length"))
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise Rejected(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise Rejected(400, "the request body must be a JSON object")
        info = describe(path, body)
        await ctx.admission.acquire()
        ctx.inflight += 1
        try:
            upstream = {k: v for k, v in headers.items() if k not in DROPPED_HEADERS}
            upstream["x-request-id"] = request_id
            deadline = Deadline(ctx.args.request_timeout_secs)
            if ctx.pd:
                routing = route_pd(ctx, path, body, info, upstream, request_id, deadline)
            else:
                routing = route_regular(ctx, path, raw, info, upstream, request_id, deadline)
            answer = await self.until_gone(routing, receive)
        except BaseException:
            self.release()
            raise
        if answer.stream is None:
            self.release()
        else:  # admission is held until the stream ends
            answer.stream = self.held(answer.stream)
        return answer

    def release(self) -> None:
        self.ctx.inflight -= 1
        self.ctx.admission.release()

    async def held(self, stream):
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()  # its cleanup closes the workers' connections
            self.release()

    async def until_gone(self, work, receive):
        """Run `work` here; a client that disconnects meanwhile cancels it (ClientGone)."""
        me = asyncio.current_task()
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            me.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            return await work
        except asyncio.CancelledError:
            if gone:
                raise ClientGone from None
            raise
        finally:
            watcher.cancel()

    async def respond(self, answer: Answer, receive, send) -> None:
        if answer.stream is None:
            await send_answer(send, answer)
            return
        try:  # a client leaving mid-stream cancels the relay (its cleanup aborts the workers' side)
            await self.until_gone(send_answer(send, answer), receive)
        except ClientGone:
            await answer.stream.aclose()
        except OSError:  # the socket broke while sending
            await answer.stream.aclose()
