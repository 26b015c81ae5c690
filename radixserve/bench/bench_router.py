"""Router overhead benchmark: N mock workers, each router under test in front of them, closed-loop load on
/generate (non-streaming and streaming) at several concurrency levels, and the same load straight to one
worker as the baseline, so each router's added latency shows.

    python -m radixserve.bench.bench_router --routers sglang,radixserve --num-workers 2 \\
        --concurrency 64 256 --duration 10 --output-file bench_router.json

Routers: `sglang` = python -m sglang_router.launch_router, `radixserve` = python -m radixserve.launch_router,
both started with --worker-urls ... --host 127.0.0.1 --port P --policy POLICY --prometheus-port Q
--log-level warn (plus --router-args). A router is ready once probes through it reach every worker.

Client, router and workers share this machine's cores: the numbers compare routers under the same
squeeze, they are not the routers' capacity. The router's CPU time per request is reported too.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import math
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from radixserve.bench.local_procs import LocalProc, free_port, spawn, spawn_mock_worker, wait_http
from radixserve.bench.router_load import HEADERS, LoadSpec, new_session, percentile, run_load

ROUTER_MODULES = {"sglang": "sglang_router.launch_router", "radixserve": "radixserve.launch_router"}
DIRECT = "direct"


@dataclass
class RunRow:
    target: str  # "direct" (one worker, no router) or a router name
    concurrency: int
    stream: bool
    requests: int
    errors: int
    elapsed_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    ttft_p50_ms: float  # streaming only (NaN otherwise)
    added_p50_ms: float = float("nan")  # vs direct at the same concurrency and mode
    added_p99_ms: float = float("nan")
    router_cpu_ms_per_req: float = float("nan")
    workers_cpu_ms_per_req: float = float("nan")
    client_cpu_ms_per_req: float = float("nan")
    per_worker: dict[str, int] = field(default_factory=dict)  # requests each worker served in the run
    error_samples: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m radixserve.bench.bench_router",
                                description=__doc__.split("\n")[0])
    p.add_argument("--routers", default="sglang,radixserve", help=f"comma list of {sorted(ROUTER_MODULES)}")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    p.add_argument("--modes", default="nonstream,stream", help="comma list of nonstream, stream")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per run")
    p.add_argument("--num-requests", type=int, default=0, help="requests per run instead of --duration")
    p.add_argument("--warmup-requests", type=int, default=0,
                   help="per run, unmeasured (default 2 x concurrency)")
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument("--output-tokens", type=int, default=8, help="max_new_tokens of each request")
    p.add_argument("--policy", default="round_robin")
    p.add_argument("--router-args", default="", help="extra flags for every router, one shell-quoted string")
    p.add_argument("--worker-latency-ms", type=float, default=0.0, help="mock workers' --latency-ms")
    p.add_argument("--worker-token-latency-ms", type=float, default=0.0,
                   help="mock workers' --token-latency-ms")
    p.add_argument("--router-startup-timeout", type=float, default=60.0)
    p.add_argument("--no-direct", action="store_true", help="skip the one-worker baseline (no added latency)")
    p.add_argument("--log-dir", default=None, help="router and worker logs (default: a new temp dir)")
    p.add_argument("--output-file", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.routers = [r for r in args.routers.split(",") if r]
    args.modes = [m for m in args.modes.split(",") if m]
    for r in args.routers:
        if r not in ROUTER_MODULES:
            p.error(f"unknown router {r!r}; known: {sorted(ROUTER_MODULES)}")
    for m in args.modes:
        if m not in ("nonstream", "stream"):
            p.error(f"unknown mode {m!r}")
    return args


def router_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(ROUTER_MODULES[name]) is not None
    except ModuleNotFoundError:
        return False


def start_router(name: str, urls: list[str], args: argparse.Namespace, log_dir: str) -> tuple[LocalProc, str]:
    port, prom = free_port(), free_port()
    cmd = ["-m", ROUTER_MODULES[name], "--worker-urls", *urls, "--host", "127.0.0.1", "--port", str(port),
           "--policy", args.policy, "--prometheus-port", str(prom), "--log-level", "warn",
           *shlex.split(args.router_args)]
    proc = spawn(name, cmd, os.path.join(log_dir, f"router_{name}.log"))
    return proc, f"http://127.0.0.1:{port}"


async def wait_router(proc: LocalProc, base: str, workers: list[str], timeout_s: float) -> None:
    """Ready once /generate through the router has reached every worker (a router may answer /health
    before it has registered its workers), or after 4 successes per worker whatever they reached."""
    seen: set[str] = set()
    ok = 0
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        i = 0
        while time.monotonic() < deadline:
            if not proc.alive():
                code = proc.popen.returncode
                raise RuntimeError(f"router {proc.name} exited with {code}:\n{proc.log_tail()}")
            i += 1
            body = orjson.dumps({"text": f"probe {i}", "sampling_params": {"max_new_tokens": 1}})
            try:
                async with s.post(f"{base}/generate", data=body, headers=HEADERS) as r:
                    if r.status == 200:
                        ok += 1
                        seen.add(str((await r.json(content_type=None))["meta_info"].get("worker")))
                        if seen >= set(workers) or ok >= 4 * len(workers):
                            return
                        continue
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, KeyError, ValueError):
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"router {proc.name} not serving after {timeout_s:.0f} s:\n{proc.log_tail()}")


async def worker_counts(session: aiohttp.ClientSession, urls: list[str]) -> dict[str, int]:
    out = {}
    for u in urls:
        async with session.get(f"{u}/mock/stats") as r:
            st = await r.json()
            out[st["worker"]] = st["requests"]
    return out


async def measure(target: str, url: str, conc: int, stream: bool, args: argparse.Namespace,
                  worker_urls: list[str], workers: list[LocalProc], router: LocalProc | None) -> RunRow:
    spec = LoadSpec(url=f"{url}/generate", concurrency=conc, stream=stream, duration_s=args.duration,
                    num_requests=args.num_requests, prompt_words=args.prompt_words,
                    output_tokens=args.output_tokens)
    async with aiohttp.ClientSession() as side:
        session = new_session(conc)
        try:
            warm = dataclasses.replace(spec, num_requests=args.warmup_requests or 2 * conc)
            await run_load(warm, session)
            before = await worker_counts(side, worker_urls)
            cpu0 = (router.cpu_seconds() if router else 0.0, sum(w.cpu_seconds() for w in workers),
                    time.process_time())
            res = await run_load(spec, session)
            cpu1 = (router.cpu_seconds() if router else 0.0, sum(w.cpu_seconds() for w in workers),
                    time.process_time())
            after = await worker_counts(side, worker_urls)
        finally:
            await session.close()
    n = len(res.latencies)
    per_req = [(b - a) * 1000 / max(1, n + res.errors) for a, b in zip(cpu0, cpu1)]
    ms = [x * 1000 for x in res.latencies]
    return RunRow(
        target=target, concurrency=conc, stream=stream, requests=n, errors=res.errors,
        elapsed_s=res.elapsed_s, rps=n / res.elapsed_s if res.elapsed_s else 0.0,
        p50_ms=percentile(ms, 50), p99_ms=percentile(ms, 99), mean_ms=sum(ms) / n if n else float("nan"),
        ttft_p50_ms=percentile([x * 1000 for x in res.ttfts], 50) if stream else float("nan"),
        router_cpu_ms_per_req=per_req[0] if router else float("nan"), workers_cpu_ms_per_req=per_req[1],
        client_cpu_ms_per_req=per_req[2], per_worker={k: after[k] - before.get(k, 0) for k in after},
        error_samples=res.error_samples,
    )


async def run_target(target: str, url: str, args: argparse.Namespace, worker_urls: list[str],
                     workers: list[LocalProc], router: LocalProc | None) -> list[RunRow]:
    rows = []
    for conc in args.concurrency:
        for mode in args.modes:
            row = await measure(target, url, conc, mode == "stream", args, worker_urls, workers, router)
            print(f"  {target:>10} c={conc:<4} {mode:<9} {row.rps:8.0f} req/s  p50 {row.p50_ms:7.2f} ms  "
                  f"p99 {row.p99_ms:7.2f} ms  errors {row.errors}", flush=True)
            rows.append(row)
    return rows


def add_overhead(rows: list[RunRow]) -> None:
    direct = {(r.concurrency, r.stream): r for r in rows if r.target == DIRECT}
    for r in rows:
        d = direct.get((r.concurrency, r.stream))
        if r.target != DIRECT and d is not None:
            r.added_p50_ms = r.p50_ms - d.p50_ms
            r.added_p99_ms = r.p99_ms - d.p99_ms


def _f(x: float, digits: int = 2) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def format_table(rows: list[RunRow]) -> str:
    head = ("| target | conc | stream | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | TTFT p50 ms "
            "| errors | router CPU ms/req | per worker |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        spread = " / ".join(str(v) for v in r.per_worker.values())
        lines.append(f"| {r.target} | {r.concurrency} | {'yes' if r.stream else 'no'} | {r.rps:.0f} | "
                     f"{_f(r.p50_ms)} | {_f(r.p99_ms)} | {_f(r.added_p50_ms)} | {_f(r.added_p99_ms)} | "
                     f"{_f(r.ttft_p50_ms)} | {r.errors} | {_f(r.router_cpu_ms_per_req, 3)} | {spread} |")
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


async def bench(args: argparse.Namespace) -> list[RunRow]:
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="bench_router_")
    os.makedirs(log_dir, exist_ok=True)
    ports = [free_port() for _ in range(args.num_workers)]
    flags = ["--latency-ms", str(args.worker_latency_ms), "--token-latency-ms",
             str(args.worker_token_latency_ms), "--output-tokens", str(args.output_tokens)]
    workers = [spawn_mock_worker(p, os.path.join(log_dir, f"worker_{p}.log"), *flags) for p in ports]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    rows: list[RunRow] = []
    try:
        for w, u in zip(workers, urls):
            await asyncio.to_thread(wait_http, f"{u}/health", w, 30.0)
        print(f"{len(workers)} mock workers up: {' '.join(urls)} (logs in {log_dir})", flush=True)
        if not args.no_direct:
            rows += await run_target(DIRECT, urls[0], args, urls, workers, None)
        for name in args.routers:
            if not router_available(name):
                print(f"router {name}: skipped, {ROUTER_MODULES[name]} is not importable", file=sys.stderr)
                continue
            proc, base = start_router(name, urls, args, log_dir)
            try:
                await wait_router(proc, base, [str(p) for p in ports], args.router_startup_timeout)
                rows += await run_target(name, base, args, urls, workers, proc)
            finally:
                proc.stop()
    finally:
        for w in workers:
            w.stop()
    add_overhead(rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvloop  # the client shares the cores with what it measures: keep its loop cheap

        rows = uvloop.run(bench(args))
    except ImportError:
        rows = asyncio.run(bench(args))
    print()
    print(format_table(rows))
    if args.output_file:
        results = [dataclasses.asdict(r) for r in rows]
        doc = {"config": vars(args), "cpu_count": os.cpu_count(), "results": results}
        with open(args.output_file, "w") as f:
            json.dump(_json_safe(doc), f, indent=2)
        print(f"\nwrote {args.output_file}")


if __name__ == "__main__":
    main()
