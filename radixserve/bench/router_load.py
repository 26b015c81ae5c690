"""Closed-loop HTTP load for router benchmarks: `concurrency` coroutines in one process, each sending its
next request as soon as the last one ends, for a fixed time or number of requests. Kept lean because the
client shares the CPU with the router and the workers: one session, connections reused (connector limit =
concurrency), request bodies encoded once, responses checked but not parsed."""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

HEADERS = {"Content-Type": "application/json"}
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")
MAX_ERROR_SAMPLES = 5


@dataclass
class LoadSpec:
    url: str  # the /generate URL of the router or worker
    concurrency: int
    stream: bool
    duration_s: float = 5.0
    num_requests: int = 0  # nonzero: send this many instead of running for duration_s
    prompt_words: int = 16
    output_tokens: int = 8
    distinct_prompts: int = 256


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    ttfts: list[float] = field(default_factory=list)  # streaming: to the first body bytes
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(what[:300])


def payloads(spec: LoadSpec, seed: int = 0) -> list[bytes]:
    """Distinct short prompts (so a cache-aware policy sees different texts), encoded once."""
    rng = random.Random(seed)
    out = []
    for i in range(spec.distinct_prompts):
        text = f"{i} " + " ".join(rng.choice(WORDS) for _ in range(spec.prompt_words))
        params = {"max_new_tokens": spec.output_tokens, "temperature": 0}
        out.append(orjson.dumps({"text": text, "stream": spec.stream, "sampling_params": params}))
    return out


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of values (q in [0, 100]); NaN when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, stream: bool, res: LoadResult) -> None:
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=HEADERS) as resp:
            if not stream:
                data = await resp.read()
                if resp.status != 200 or not data.startswith(b"{"):
                    res.error(f"{resp.status}: {data[:200]!r}")
                    return
                res.latencies.append(time.perf_counter() - t0)
                return
            first = 0.0
            tail = b""
            async for chunk in resp.content.iter_any():
                if not first:
                    first = time.perf_counter()
                tail = (tail + chunk)[-64:]
            if resp.status != 200 or not tail.rstrip().endswith(b"[DONE]"):
                res.error(f"{resp.status}: stream ended with {tail!r}")
                return
            end = time.perf_counter()
            res.latencies.append(end - t0)
            res.ttfts.append(first - t0)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        res.error(f"{type(e).__name__}: {e}")


async def run_load(spec: LoadSpec, session: aiohttp.ClientSession | None = None) -> LoadResult:
    """Drive spec's load; a session made here gets a connector limited to the concurrency."""
    own = session is None
    if own:
        session = new_session(spec.concurrency)
    bodies = payloads(spec)
    res = LoadResult()
    issued = 0
    t0 = time.perf_counter()
    deadline = t0 + spec.duration_s

    async def loop(k: int) -> None:
        nonlocal issued
        i = k
        while True:
            if spec.num_requests:
                if issued >= spec.num_requests:
                    return
                issued += 1
            elif time.perf_counter() >= deadline:
                return
            await _one(session, spec.url, bodies[i % len(bodies)], spec.stream, res)
            i += spec.concurrency

    try:
        await asyncio.gather(*(loop(k) for k in range(spec.concurrency)))
    finally:
        res.elapsed_s = time.perf_counter() - t0
        if own:
            await session.close()
    return res


def new_session(concurrency: int, timeout_s: float = 120.0) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0, keepalive_timeout=300,
                                     enable_cleanup_closed=False)
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s), auto_decompress=False)
