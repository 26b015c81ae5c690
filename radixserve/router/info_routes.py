"""Health, information and cache routes: the router's own state, or its workers' answers."""

from __future__ import annotations

import asyncio

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from radixserve.router.context import RouterContext
from radixserve.router.http_client import UpstreamError
from radixserve.router.upstream import error_response
from radixserve.router.worker import Worker


def json(value, status: int = 200) -> Response:
    return Response(orjson.dumps(value), status_code=status, media_type="application/json")


def ctx_of(request: Request) -> RouterContext:
    return request.app.state.ctx


def roles(ctx: RouterContext) -> tuple[str, ...]:
    return ("prefill", "decode") if ctx.pd else ("regular",)


async def fetch(ctx: RouterContext, worker: Worker, path: str, method: str = "GET",
                timeout: float = 30.0) -> tuple[int, bytes]:
    try:
        return await ctx.client.fetch(method, worker.url + path, headers=ctx.auth_headers(), timeout=timeout)
    except (UpstreamError, asyncio.TimeoutError, OSError) as e:
        return 502, f"{worker.url}: {type(e).__name__}".encode()


async def from_one(ctx: RouterContext, path: str, role: str | None = None) -> Response:
    """The answer of one available worker (of `role`; in PD mode a prefill server by default)."""
    role = role or roles(ctx)[0]
    workers = ctx.registry.candidates(role)
    if not workers:
        return error_response(503, f"no {role} worker is available")
    status, body = await fetch(ctx, workers[0], path)
    return Response(body, status_code=status, media_type="application/json")


async def health(request: Request) -> Response:
    return Response(b"OK", media_type="text/plain")  # the router itself is up


async def readiness(request: Request) -> Response:
    ctx = ctx_of(request)
    healthy = {role: len(ctx.registry.candidates(role)) for role in roles(ctx)}
    ready = all(healthy.values()) and not ctx.draining
    body = {"status": "ready" if ready else "not ready", "healthy_workers": sum(healthy.values()),
            "total_workers": len(ctx.registry.serving())}
    if ctx.pd:
        body.update(healthy_prefill_workers=healthy["prefill"], healthy_decode_workers=healthy["decode"])
    return json(body, 200 if ready else 503)


async def health_generate(request: Request) -> Response:
    """One available worker of each role generates a token (its /health_generate)."""
    ctx = ctx_of(request)
    picks = [ctx.registry.candidates(role) for role in roles(ctx)]
    if not all(picks):
        return error_response(503, "no worker of each role is available")
    results = await asyncio.gather(*(fetch(ctx, ws[0], "/health_generate") for ws in picks))
    bad = [f"{ws[0].url}: {status}" for ws, (status, _) in zip(picks, results) if status != 200]
    return error_response(503, "unhealthy: " + ", ".join(bad)) if bad else Response(b"OK", media_type="text/plain")


async def server_info(request: Request) -> Response:
    ctx = ctx_of(request)
    if not ctx.pd:
        return await from_one(ctx, "/get_server_info")
    out = {}
    for role in roles(ctx):
        answers = await asyncio.gather(*(fetch(ctx, w, "/get_server_info") for w in ctx.registry.candidates(role)))
        out[role] = [orjson.loads(body) for status, body in answers if status == 200]
    return json(out)


async def model_info(request: Request) -> Response:
    return await from_one(ctx_of(request), "/get_model_info")


async def models(request: Request) -> Response:
    return await from_one(ctx_of(request), "/v1/models")


async def loads(request: Request) -> Response:
    ctx = ctx_of(request)
    return json({"workers": [{"worker": w.url, "worker_type": w.role, "load": w.inflight, "token_load": w.token_load,
                              "healthy": w.healthy} for w in ctx.registry.serving()]})


async def flush_cache(request: Request) -> Response:
    ctx = ctx_of(request)
    workers = ctx.registry.serving()
    results = await asyncio.gather(*(fetch(ctx, w, "/flush_cache", "POST") for w in workers))
    failed = {w.url: f"{status} {body.decode(errors='replace')[:200]}" for w, (status, body) in zip(workers, results)
              if status != 200}
    if failed:
        return json({"message": "cache not flushed on every worker", "failed": failed}, 502)
    return Response(f"Cache flushed on {len(workers)} workers.\n".encode(), media_type="text/plain")


async def metrics(request: Request) -> Response:
    return Response(ctx_of(request).metrics.render(), media_type="text/plain; version=0.0.4")


INFO_ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/liveness", health, methods=["GET"]),
    Route("/readiness", readiness, methods=["GET"]),
    Route("/health_generate", health_generate, methods=["GET"]),
    Route("/get_server_info", server_info, methods=["GET"]),
    Route("/server_info", server_info, methods=["GET"]),
    Route("/get_model_info", model_info, methods=["GET"]),
    Route("/model_info", model_info, methods=["GET"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/get_loads", loads, methods=["GET"]),
    Route("/flush_cache", flush_cache, methods=["GET", "POST"]),
    Route("/metrics", metrics, methods=["GET"]),
]
