"""python -m radixserve.launch_router: radixserve's router, with SGLang router's flags.

    python -m radixserve.launch_router --worker-urls http://h1:30000 http://h2:30000 --policy cache_aware
    python -m radixserve.launch_router --pd-disaggregation --prefill http://p:30000 8998 \\
        --decode http://d:30001 --host 0.0.0.0 --port 8000
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

import uvicorn
from prometheus_client import start_http_server

from radixserve.router.admission import Admission
from radixserve.router.app import create_app
from radixserve.router.args import RouterArgs, RouterArgsError, parse_args
from radixserve.router.context import RouterContext
from radixserve.router.health import check_once, eviction_loop, health_loop, load_loop
from radixserve.router.metrics import RouterMetrics
from radixserve.router.policies import PolicyConfig, make_policy
from radixserve.router.registry import Registry
from radixserve.router.worker import BreakerConfig

logger = logging.getLogger("radixserve.router")


def build_context(args: RouterArgs) -> RouterContext:
    config = PolicyConfig(args.cache_threshold, args.balance_abs_threshold, args.balance_rel_threshold,
                          args.max_tree_size)
    if args.pd_disaggregation:
        policies = {"prefill": make_policy(args.prefill_policy or args.policy, config),
                    "decode": make_policy(args.decode_policy or args.policy, config)}
    else:
        policies = {"regular": make_policy(args.policy, config)}
    breaker = BreakerConfig(args.cb_failure_threshold, args.cb_success_threshold, args.cb_timeout_duration_secs,
                            args.cb_window_duration_secs, enabled=not args.disable_circuit_breaker)
    registry = Registry(policies, breaker)
    healthy = args.disable_health_check
    for url in args.worker_urls:
        registry.add(url, "regular", healthy=healthy)
    for spec in args.prefill:
        registry.add(spec.url, "prefill", spec.bootstrap_port, healthy=healthy)
    for url in args.decode:
        registry.add(url, "decode", healthy=healthy)
    for w in registry.workers.values():
        w.ever_healthy = healthy
    admission = Admission(args.max_concurrent_requests, args.queue_size, args.queue_timeout_secs,
                          args.rate_limit_tokens_per_second)
    metrics = RouterMetrics(args.prometheus_duration_buckets)
    ctx = RouterContext(args, registry, policies, admission, metrics)
    metrics.attach(lambda: list(registry.workers.values()), lambda: (ctx.inflight, admission.queued))
    return ctx


@contextlib.asynccontextmanager
async def lifespan(app):
    ctx: RouterContext = app.state.ctx
    if not ctx.args.disable_health_check:  # one round first, so that workers already up serve at once
        workers = list(ctx.registry.workers.values())
        for w, ok in zip(workers, await asyncio.gather(*(check_once(ctx, w) for w in workers))):
            if ok:
                w.healthy = w.ever_healthy = True
            else:
                logger.warning("worker %s is not up yet; it joins once its health check passes", w.url)
        ctx.background.append(asyncio.create_task(health_loop(ctx)))
    token_roles = [role for role, p in ctx.policies.items() if p.name == "minimum_tokens"]
    if token_roles:
        ctx.background.append(asyncio.create_task(load_loop(ctx, token_roles)))
    ctx.background.append(asyncio.create_task(eviction_loop(ctx)))
    logger.info("router ready on %s:%d (%s; %s)", ctx.args.host, ctx.args.port,
                "PD" if ctx.pd else "regular", ", ".join(f"{r}: {p.name}" for r, p in ctx.policies.items()))
    try:
        yield
    finally:
        ctx.draining = True
        for task in ctx.background:
            task.cancel()
        await asyncio.gather(*ctx.background, return_exceptions=True)
        await ctx.client.close()


def setup_logging(args: RouterArgs) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(args.log_dir, "router.log")))
    logging.basicConfig(level=args.log_level.upper(), handlers=handlers,
                        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except RouterArgsError as e:
        print(f"launch_router: error: {e}", file=sys.stderr)
        return 2
    setup_logging(args)
    ctx = build_context(args)
    app = create_app(ctx)
    app.rest.router.lifespan_context = lifespan
    if args.prometheus_port:
        start_http_server(args.prometheus_port, args.prometheus_host, registry=ctx.metrics.registry)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            loop="uvloop" if sys.platform != "win32" else "asyncio", http="httptools",
                            timeout_graceful_shutdown=int(args.shutdown_grace_period_secs), backlog=4096,
                            timeout_keep_alive=30)
    # uvicorn re-raises the signal that stopped it once it has drained; the handlers it restores then
    # do nothing, so that a router stopped by SIGTERM or SIGINT exits with status 0, as servers do
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run()
    logger.info("router stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
