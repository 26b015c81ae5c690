"""The router's ASGI app: the serving routes through the bare handler of serving.py (the hot path),
everything else (health, info, worker API, metrics) through a small Starlette app."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request

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


class RouterApp:
    def __init__(self, ctx: RouterContext) -> None:
        self.ctx = ctx
        middleware = []
        if ctx.args.cors_allowed_origins:
            middleware.append(Middleware(CORSMiddleware, allow_origins=ctx.args.cors_allowed_origins,
                                         allow_methods=["*"], allow_headers=["*"]))
        if ctx.args.api_key:
            middleware.append(Middleware(APIKeyMiddleware, key=ctx.args.api_key))
        self.rest = Starlette(routes=INFO_ROUTES + WORKER_ROUTES, middleware=middleware)
        self.rest.state.ctx = ctx
        self.serving: Any = ServingHandler(ctx)
        self.methods = {"POST"}
        if ctx.args.cors_allowed_origins:  # preflights and CORS headers for the serving routes too
            self.serving = CORSMiddleware(self.serving, allow_origins=ctx.args.cors_allowed_origins,
                                          allow_methods=["*"], allow_headers=["*"])
            self.methods.add("OPTIONS")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] in SERVING_PATHS and scope["method"] in self.methods:
            await self.serving(scope, receive, send)
            return
        await self.rest(scope, receive, send)


def create_app(ctx: RouterContext) -> RouterApp:
    return RouterApp(ctx)
