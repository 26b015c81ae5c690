"""The router's ASGI app: the serving routes through the bare handler of serving.py (the hot path),
everything else (health, info, worker API, metrics) through a small Starlette app."""

from __future__ import annotations

import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from radixserve.router.context import RouterContext
from radixserve.router.info_routes import INFO_ROUTES
from radixserve.router.serving import SERVING_PATHS, ServingHandler
from radixserve.router.upstream import error_response
from radixserve.router.worker_routes import WORKER_ROUTES

OPEN_PATHS = frozenset({"/health", "/liveness", "/readiness", "/metrics"})  # no API key needed


class APIKeyMiddleware:
    """--api-key for the routes other than serving ones (serving.py checks its own)."""

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.key = key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            request = Request(scope)
            if request.headers.get("authorization") != f"Bearer {self.key}" and \
                    request.headers.get("x-api-key") != self.key:
                await error_response(401, "missing or wrong API key (Authorization: Bearer KEY)")(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def http_error(request: Request, exc: HTTPException) -> Response:
    """404 and 405 (and any other HTTP error) as the OpenAI error envelope."""
    response = error_response(exc.status_code, exc.detail or "error")
    if exc.headers:
        response.headers.update(exc.headers)
    return response


class RequestIdMiddleware:
    """x-request-id on every answer of the non-serving routes too (serving.py sets its own): the first
    of --request-id-headers the request had, else a new id."""

    def __init__(self, app: Any, names: list[str]) -> None:
        self.app = app
        self.names = [n.encode("latin-1") for n in names]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"])
        request_id = next((given[n] for n in self.names if given.get(n)), None) or uuid.uuid4().hex.encode()

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


async def not_served(request: Request) -> Response:  # placeholder: POST is served by serving.py
    raise HTTPException(405, f"{request.method} is not allowed on {request.url.path}; use POST",
                        headers={"Allow": "POST"})


class RouterApp:
    def __init__(self, ctx: RouterContext) -> None:
        self.ctx = ctx
        middleware = [Middleware(RequestIdMiddleware, names=ctx.args.request_id_headers)]
        if ctx.args.api_key:
            middleware.append(Middleware(APIKeyMiddleware, key=ctx.args.api_key))
        # the serving paths answer other methods with a 405 naming POST
        other_methods = [Route(p, not_served, methods=["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
                         for p in SERVING_PATHS]
        self.rest = Starlette(routes=INFO_ROUTES + WORKER_ROUTES + other_methods, middleware=middleware,
                              exception_handlers={HTTPException: http_error})
        self.rest.state.ctx = ctx
        self.serving = ServingHandler(ctx)
        # CORS in front of everything, preflights answered before the API key is asked for; no
        # --cors-allowed-origins allows any origin, as SGLang's router does
        self.app = CORSMiddleware(self.dispatch, allow_origins=ctx.args.cors_allowed_origins or ["*"],
                                  allow_methods=["*"], allow_headers=["*"], expose_headers=["x-request-id"])

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)

    async def dispatch(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] in SERVING_PATHS and scope["method"] == "POST":
            await self.serving(scope, receive, send)
            return
        await self.rest(scope, receive, send)


def create_app(ctx: RouterContext) -> RouterApp:
    return RouterApp(ctx)
