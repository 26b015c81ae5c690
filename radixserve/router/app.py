"""The router's HTTP app: the serving routes (admission, payload limit, API key, request id,
timeout, client disconnects), health and info routes, and the worker API."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from radixserve.router.admission import Rejected
from radixserve.router.context import RouterContext
from radixserve.router.dispatch import Deadline, route_regular
from radixserve.router.info_routes import INFO_ROUTES
from radixserve.router.pd import route_pd
from radixserve.router.request_info import describe
from radixserve.router.upstream import error_response, forward_headers
from radixserve.router.worker_routes import WORKER_ROUTES

logger = logging.getLogger("radixserve.router")

SERVING_PATHS = ("/generate", "/v1/chat/completions", "/v1/completions")
OPEN_PATHS = frozenset({"/health", "/liveness", "/readiness", "/metrics"})  # no API key needed


def request_id_of(ctx: RouterContext, request: Request) -> str:
    for name in ctx.args.request_id_headers:
        value = request.headers.get(name)
        if value:
            return value
    return uuid.uuid4().hex


async def read_body(ctx: RouterContext, request: Request) -> bytes:
    """The body, or Rejected(413) past --max-payload-size (by its length header, or as it arrives)."""
    limit = ctx.args.max_payload_size
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Rejected(413, f"request body of {declared} bytes is over --max-payload-size ({limit})")
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected(413, f"request body is over --max-payload-size ({limit} bytes)")
        parts.append(chunk)
    return b"".join(parts)


async def until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def serve(request: Request) -> Response:
    ctx: RouterContext = request.app.state.ctx
    path = request.url.path
    request_id = request_id_of(ctx, request)
    started = time.perf_counter()
    status = 500
    try:
        response = await _serve(ctx, request, path, request_id)
        status = response.status_code
        return response
    except Rejected as e:
        status = e.status
        return error_response(e.status, e.message, request_id)
    finally:
        ctx.metrics.requests.labels(path, str(status)).inc()
        ctx.metrics.latency.labels(path).observe(time.perf_counter() - started)


async def _serve(ctx: RouterContext, request: Request, path: str, request_id: str) -> Response:
    if ctx.draining:
        raise Rejected(503, "the router is shutting down")
    try:
        raw = await read_body(ctx, request)
    except ClientDisconnect:
        raise Rejected(400, "the client left while sending its request") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Rejected(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Rejected(400, "the request body must be a JSON object")
    info = describe(path, body)
    try:
        await ctx.admission.acquire()
    except Rejected as e:
        ctx.metrics.rejected.labels("queue_full" if e.status == 429 else "queue_timeout").inc()
        raise
    ctx.inflight += 1
    released = False

    def done() -> None:
        nonlocal released
        if not released:
            released = True
            ctx.inflight -= 1
            ctx.admission.release()

    try:
        headers = forward_headers(request.headers, request_id)
        deadline = Deadline(ctx.args.request_timeout_secs)
        if ctx.pd:
            routing = route_pd(ctx, path, body, info, headers, request_id, deadline)
        else:
            routing = route_regular(ctx, path, raw, info, headers, request_id, deadline)
        # a client that leaves before the answer starts: the routing is cancelled, which closes the
        # connections to the workers and so aborts the request there
        task = asyncio.ensure_future(routing)
        watcher = asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait([task, watcher], timeout=deadline.left() + 1.0,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if watcher.done() and not watcher.cancelled():
                done()
                return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
            raise Rejected(504, f"no answer within --request-timeout-secs ({ctx.args.request_timeout_secs:g} s)")
        response = task.result()
        if hasattr(response, "body_iterator"):  # a stream: admission is held until it ends
            response.background = None
            inner = response.body_iterator

            async def held():
                try:
                    async for chunk in inner:
                        yield chunk
                finally:
                    await inner.aclose()  # its cleanup closes the workers' connections
                    done()

            response.body_iterator = held()
        else:
            done()
        return response
    except BaseException:
        done()
        raise


def check_api_key(ctx: RouterContext, request: Request) -> Response | None:
    key = ctx.args.api_key
    if key is None or request.url.path in OPEN_PATHS:
        return None
    given = request.headers.get("authorization", "")
    if given == f"Bearer {key}" or request.headers.get("x-api-key") == key:
        return None
    return error_response(401, "missing or wrong API key (Authorization: Bearer KEY)")


class APIKeyMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            refusal = check_api_key(scope["app"].state.ctx, request)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(ctx: RouterContext) -> Starlette:
    routes = [Route(p, serve, methods=["POST"]) for p in SERVING_PATHS] + INFO_ROUTES + WORKER_ROUTES
    middleware = [Middleware(APIKeyMiddleware)]
    if ctx.args.cors_allowed_origins:
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=ctx.args.cors_allowed_origins,
                                        allow_methods=["*"], allow_headers=["*"]))
    app = Starlette(routes=routes, middleware=middleware)
    app.state.ctx = ctx
    return app
