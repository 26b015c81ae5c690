"""Workers while serving: POST/GET /workers, GET/DELETE /workers/{url}, and SGLang's older
/add_worker, /remove_worker and /list_workers. A new worker takes requests once it passes a health
check; a removed one takes no new requests and leaves when its in-flight ones have ended."""

from __future__ import annotations

from urllib.parse import unquote

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from radixserve.router.args import RouterArgsError, check_url
from radixserve.router.context import RouterContext
from radixserve.router.health import check_once
from radixserve.router.info_routes import json
from radixserve.router.registry import WorkerExists
from radixserve.router.upstream import error_response
from radixserve.router.worker import Worker


def describe(w: Worker) -> dict:
    return {"url": w.url, "worker_type": w.role, "bootstrap_port": w.bootstrap_port, "healthy": w.healthy,
            "draining": w.draining, "inflight": w.inflight, "token_load": w.token_load,
            "circuit_state": w.breaker.state, "requests": w.total_requests, "failed_requests": w.failed_requests}


async def add(ctx: RouterContext, url: str, role: str | None, bootstrap_port) -> Response:
    try:
        url = check_url(url)
    except RouterArgsError as e:
        return error_response(400, str(e))
    role = role or ("prefill" if ctx.pd else "regular")
    if bootstrap_port is not None and (not isinstance(bootstrap_port, int) or not 0 < bootstrap_port < 65536):
        return error_response(400, f"bootstrap_port must be a port number, got {bootstrap_port!r}")
    try:
        worker = ctx.registry.add(url, role, bootstrap_port, healthy=False)
    except WorkerExists as e:
        return error_response(409, str(e))
    except ValueError as e:
        return error_response(400, str(e))
    if ctx.args.disable_health_check or await check_once(ctx, worker):
        worker.healthy = worker.ever_healthy = True
    return json({"status": "added", "worker": describe(worker)}, 201)


async def post_workers(request: Request) -> Response:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return error_response(400, "the request body is not valid JSON")
    if not isinstance(body, dict) or not isinstance(body.get("url"), str):
        return error_response(400, 'expected {"url": "http://host:port", "worker_type": "regular|prefill|decode", '
                                   '"bootstrap_port": N}')
    return await add(request.app.state.ctx, body["url"], body.get("worker_type"), body.get("bootstrap_port"))


async def list_workers(request: Request) -> Response:
    ctx: RouterContext = request.app.state.ctx
    workers = [describe(w) for w in ctx.registry.workers.values()]
    return json({"workers": workers, "total": len(workers)})


def url_param(request: Request) -> str:
    return unquote(request.path_params["url"]).rstrip("/")


async def get_worker(request: Request) -> Response:
    ctx: RouterContext = request.app.state.ctx
    worker = ctx.registry.workers.get(url_param(request))
    return json(describe(worker)) if worker else error_response(404, f"no worker {url_param(request)}")


async def delete_worker(request: Request) -> Response:
    return remove(request.app.state.ctx, url_param(request))


def remove(ctx: RouterContext, url: str) -> Response:
    worker = ctx.registry.remove(url)
    if worker is None:
        return error_response(404, f"no worker {url}")
    return json({"status": "removing" if worker.inflight else "removed", "worker": describe(worker)}, 202)


async def add_worker_legacy(request: Request) -> Response:
    url = request.query_params.get("url")
    if not url:
        return error_response(400, "add_worker needs ?url=http://host:port")
    port = request.query_params.get("bootstrap_port")
    return await add(request.app.state.ctx, url, request.query_params.get("worker_type"),
                     int(port) if port and port.isdigit() else None)


async def remove_worker_legacy(request: Request) -> Response:
    url = request.query_params.get("url")
    if not url:
        return error_response(400, "remove_worker needs ?url=http://host:port")
    return remove(request.app.state.ctx, url.rstrip("/"))


async def list_workers_legacy(request: Request) -> Response:
    ctx: RouterContext = request.app.state.ctx
    return json({"urls": [w.url for w in ctx.registry.serving()]})


WORKER_ROUTES = [
    Route("/workers", post_workers, methods=["POST"]),
    Route("/workers", list_workers, methods=["GET"]),
    Route("/workers/{url:path}", get_worker, methods=["GET"]),
    Route("/workers/{url:path}", delete_worker, methods=["DELETE"]),
    Route("/add_worker", add_worker_legacy, methods=["POST"]),
    Route("/remove_worker", remove_worker_legacy, methods=["POST"]),
    Route("/list_workers", list_workers_legacy, methods=["GET"]),
]
