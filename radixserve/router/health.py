"""The router's background work: health checks that take workers out and back in (with failure
and success thresholds), load reads for minimum_tokens, and the cache-aware trees' eviction."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson

from radixserve.router.context import RouterContext
from radixserve.router.http_client import UpstreamError
from radixserve.router.worker import Worker

logger = logging.getLogger("radixserve.router")

LOAD_POLL_SECS = 1.0  # how often minimum_tokens reads each worker's /get_load


async def check_once(ctx: RouterContext, worker: Worker) -> bool:
    url = worker.url + ctx.args.health_check_endpoint
    try:
        status, _ = await ctx.client.fetch("GET", url, headers=ctx.auth_headers(),
                                           timeout=ctx.args.health_check_timeout_secs)
        return status == 200
    except (UpstreamError, asyncio.TimeoutError, OSError):
        return False


def apply_check(ctx: RouterContext, worker: Worker, ok: bool, started: bool) -> None:
    """Count a check: a healthy worker goes out after --health-failure-threshold failures in a row;
    one out comes back after --health-success-threshold successes (one, while it has never been up)."""
    a = ctx.args
    if ok:
        worker.health_failures = 0
        if not worker.healthy:
            worker.health_successes += 1
            if not started or worker.health_successes >= a.health_success_threshold:
                worker.healthy, worker.health_successes = True, 0
                worker.ever_healthy = True
                logger.info("worker %s is healthy", worker.url)
    else:
        worker.health_successes = 0
        if worker.healthy:
            worker.health_failures += 1
            if worker.health_failures >= a.health_failure_threshold:
                worker.healthy = False
                logger.warning("worker %s is unhealthy (%d failed checks)", worker.url, worker.health_failures)


async def health_loop(ctx: RouterContext) -> None:
    due: dict[int, float] = {}  # id(worker) -> when its next check is due
    while True:
        now = time.monotonic()
        workers = [w for w in ctx.registry.workers.values() if not w.draining]
        checks = []
        for w in workers:
            if due.get(id(w), 0.0) <= now:
                waiting_start = not w.ever_healthy and now - w.added_at < ctx.args.worker_startup_timeout_secs
                due[id(w)] = now + (ctx.args.worker_startup_check_interval if waiting_start
                                    else ctx.args.health_check_interval_secs)
                checks.append(w)
        if checks:
            results = await asyncio.gather(*(check_once(ctx, w) for w in checks))
            for w, ok in zip(checks, results):
                apply_check(ctx, w, ok, started=w.ever_healthy)
        live = {id(w) for w in workers}
        for key in [k for k in due if k not in live]:
            del due[key]
        await asyncio.sleep(min(1.0, ctx.args.worker_startup_check_interval, ctx.args.health_check_interval_secs))


async def read_load(ctx: RouterContext, worker: Worker) -> None:
    try:
        status, body = await ctx.client.fetch("GET", worker.url + "/get_load", headers=ctx.auth_headers(), timeout=5)
        if status == 200:
            loads = orjson.loads(body)
            groups = loads if isinstance(loads, list) else [loads]
            worker.report(sum(int(g.get("num_tokens", 0)) for g in groups if isinstance(g, dict)))
    except (UpstreamError, asyncio.TimeoutError, OSError, ValueError):
        pass  # the health checks deal with a worker that is down


async def load_loop(ctx: RouterContext, roles: list[str]) -> None:
    while True:
        workers = [w for w in ctx.registry.workers.values() if w.role in roles and w.available]
        if workers:
            await asyncio.gather(*(read_load(ctx, w) for w in workers))
        await asyncio.sleep(LOAD_POLL_SECS)


async def eviction_loop(ctx: RouterContext) -> None:
    while True:
        await asyncio.sleep(ctx.args.eviction_interval_secs)
        for policy in ctx.policies.values():
            policy.evict()
