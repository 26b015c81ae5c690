"""Regular mode: one worker per request, chosen by the policy; on a connection error or a 408, 429
or 5xx before any byte reached the client, another worker is tried after a backoff. A stream is
passed through chunk by chunk; a worker failing mid-stream becomes an error event that ends it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from radixserve.router.context import RouterContext
from radixserve.router.http_client import ConnectFailed, Response, UpstreamError
from radixserve.router.request_info import RequestInfo
from radixserve.router.upstream import (
    RETRYABLE,
    Answer,
    answer_headers,
    backoff_seconds,
    error_answer,
    error_chunk,
)
from radixserve.router.worker import Worker

logger = logging.getLogger("radixserve.router")


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.seconds = seconds

    def left(self) -> float:
        return max(0.001, self.at - time.monotonic())


def mark_unreachable(ctx: RouterContext, worker: Worker, error: BaseException) -> None:
    """A worker that refuses connections is down: out until a health check passes again (with
    health checks off, its circuit breaker alone keeps it out)."""
    if isinstance(error, ConnectFailed) and not ctx.args.disable_health_check and worker.healthy:
        worker.healthy = False
        worker.health_failures = worker.health_successes = 0
        logger.warning("worker %s refuses connections: out until its health check passes", worker.url)


async def pause_before_retry(ctx: RouterContext, retry: int, route: str) -> None:
    a = ctx.args
    ctx.metrics.retries.labels(route).inc()
    await asyncio.sleep(backoff_seconds(retry, a.retry_initial_backoff_ms, a.retry_max_backoff_ms,
                                        a.retry_backoff_multiplier, a.retry_jitter_factor))


async def relay(ctx: RouterContext, resp: Response, workers: list[tuple[Worker, int]],
                first: bytes = b"") -> AsyncIterator[bytes]:
    """A worker's stream, chunk by chunk. Whatever ends it (the end, a failure, the client leaving)
    closes the upstream connection, which aborts the request on the worker, and releases it."""
    ok = False
    try:
        if first:
            yield first
        async for chunk in resp:
            yield chunk
        ok = True
    except (UpstreamError, asyncio.TimeoutError) as e:
        status = 504 if isinstance(e, asyncio.TimeoutError) else 502
        logger.warning("stream from %s broke off: %r", workers[0][0].url, e)
        yield error_chunk(status, f"the worker's stream broke off: {type(e).__name__} {e}".strip())
    finally:
        resp.close()
        for worker, tokens in workers:
            ctx.registry.release(worker, tokens, ok)


async def route_regular(ctx: RouterContext, path: str, raw: bytes, info: RequestInfo, headers: dict[str, str],
                        request_id: str, deadline: Deadline) -> Answer:
    tokens = info.key.tokens
    tried: set[str] = set()
    last: Answer | None = None
    for attempt in range(ctx.args.max_attempts):
        if attempt:
            await pause_before_retry(ctx, attempt, path)
        candidates = ctx.registry.candidates("regular", tried)
        if not candidates:
            return last or error_answer(503, "no worker is available (none healthy, all removed, or their "
                                               "circuit breakers open)", request_id)
        worker = ctx.policies["regular"].select(candidates, info.key)
        tried.add(worker.url)
        worker.started(tokens)
        resp = None
        try:
            resp = await ctx.client.request("POST", worker.url + path, raw, headers, deadline.left())
            if resp.status == 200 and info.stream:
                streaming = Answer(200, media_type=resp.headers.get("content-type", "text/event-stream"),
                                   headers=answer_headers(resp.headers, request_id),
                                   stream=relay(ctx, resp, [(worker, tokens)]))
                resp = None  # relay owns it now
                return streaming
            body = await resp.read()
            status, media = resp.status, resp.headers.get("content-type", "application/json")
            passed = answer_headers(resp.headers, request_id)
        except asyncio.TimeoutError:
            ctx.registry.release(worker, tokens, ok=False)
            return error_answer(504, f"no answer within --request-timeout-secs ({deadline.seconds:g} s)",
                                  request_id)
        except (UpstreamError, OSError) as e:
            ctx.registry.release(worker, tokens, ok=False)
            mark_unreachable(ctx, worker, e)
            logger.warning("worker %s failed: %r", worker.url, e)
            last = error_answer(502, f"worker {worker.url} failed: {type(e).__name__}", request_id)
            continue
        except BaseException:  # cancelled (the client left): the closed connection aborts it there
            ctx.registry.release(worker, tokens, ok=True)
            raise
        finally:
            if resp is not None:
                resp.close()
        ctx.registry.release(worker, tokens, ok=status < 500)
        answer = Answer(status, body, media, passed)
        if status not in RETRYABLE:
            return answer
        last = answer
    return last
