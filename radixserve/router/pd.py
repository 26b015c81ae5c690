"""PD mode: each request goes to a prefill server and a decode server, picked by their own
policies, with SGLang's bootstrap fields added (the prefill server's host, its bootstrap port from
`--prefill URL PORT`, a random 63-bit room; a list of each for a /generate batch). The decode
server's answer goes back to the client; for /generate with return_logprob, the prompt's logprobs
come from the prefill server's answer. A prefill failure ends the decode side's request (its
connection is closed, which aborts it there); before any byte reached the client, a failed pair is
retried on another pair with a new room."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import orjson

from radixserve.router.context import RouterContext
from radixserve.router.dispatch import Deadline, mark_unreachable, pause_before_retry
from radixserve.router.http_client import Response, UpstreamError
from radixserve.router.request_info import RequestInfo
from radixserve.router.upstream import RETRYABLE, Answer, answer_headers, error_answer, error_chunk
from radixserve.router.worker import Worker

logger = logging.getLogger("radixserve.router")

ROOM_LIMIT = 1 << 63
PROMPT_LOGPROB_KEYS = ("input_token_logprobs", "input_top_logprobs", "input_token_ids_logprobs")


def with_bootstrap(body: dict[str, Any], prefill: Worker, batch: int | None) -> dict[str, Any]:
    host = urlsplit(prefill.url).hostname
    if batch is None:
        return {**body, "bootstrap_host": host, "bootstrap_port": prefill.bootstrap_port,
                "bootstrap_room": random.randrange(ROOM_LIMIT)}
    return {**body, "bootstrap_host": [host] * batch, "bootstrap_port": [prefill.bootstrap_port] * batch,
            "bootstrap_room": [random.randrange(ROOM_LIMIT) for _ in range(batch)]}


class PrefillFailed(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


async def fetch_prefill(ctx: RouterContext, worker: Worker, path: str, raw: bytes, headers: dict[str, str],
                        deadline: Deadline) -> bytes:
    """The prefill server's whole answer; PrefillFailed for anything but a 200."""
    try:
        status, body = await ctx.client.fetch("POST", worker.url + path, raw, headers, deadline.left())
    except asyncio.TimeoutError:
        raise PrefillFailed(504, b"") from None
    except (UpstreamError, OSError) as e:
        mark_unreachable(ctx, worker, e)
        raise PrefillFailed(502, f"prefill server {worker.url} failed: {type(e).__name__}".encode()) from None
    if status != 200:
        raise PrefillFailed(status, body)
    return body


def merge_prompt_logprobs(decode: Any, prefill: Any) -> Any:
    """Put the prefill answer's prompt logprobs into the decode answer (dicts, or lists of them)."""
    if isinstance(decode, list) and isinstance(prefill, list):
        return [merge_prompt_logprobs(d, p) for d, p in zip(decode, prefill)]
    if isinstance(decode, dict) and isinstance(prefill, dict):
        d_meta, p_meta = decode.get("meta_info"), prefill.get("meta_info")
        if isinstance(d_meta, dict) and isinstance(p_meta, dict):
            for k in PROMPT_LOGPROB_KEYS:
                if p_meta.get(k) and not d_meta.get(k):
                    d_meta[k] = p_meta[k]
    return decode


class PDStream:
    """Relays the decode server's stream. With return_logprob, the first event of each prompt gets
    the prefill answer's prompt logprobs (the decode server sends none)."""

    def __init__(self, ctx: RouterContext, resp: Response, prefill_task: asyncio.Task,
                 pair: list[tuple[Worker, int]], info: RequestInfo) -> None:
        self.ctx, self.resp, self.prefill_task, self.pair, self.info = ctx, resp, prefill_task, pair, info
        self.prefill_error: PrefillFailed | None = None

    def watch_prefill(self) -> None:
        """A failed prefill closes the decode stream (which ends the request there)."""
        def done(task: asyncio.Task) -> None:
            if not task.cancelled() and isinstance(task.exception(), PrefillFailed):
                self.prefill_error = task.exception()
                self.resp.close()
        self.prefill_task.add_done_callback(done)

    async def events(self) -> AsyncIterator[bytes]:
        ok = False
        try:
            if self.info.wants_logprobs:
                async for chunk in self._merged():
                    yield chunk
            async for chunk in self.resp:
                yield chunk
            ok = True
        except (UpstreamError, asyncio.TimeoutError, PrefillFailed) as e:
            if self.prefill_error is not None:
                yield error_chunk(self.prefill_error.status, "the prefill server failed: "
                                  + self.prefill_error.body.decode(errors="replace")[:500])
            else:
                yield error_chunk(504 if isinstance(e, asyncio.TimeoutError) else 502,
                                  f"the decode server's stream broke off: {type(e).__name__}")
        finally:
            self.resp.close()
            if not self.prefill_task.done():
                self.prefill_task.cancel()
            for worker, tokens in self.pair:
                self.ctx.registry.release(worker, tokens, ok)

    async def _merged(self) -> AsyncIterator[bytes]:
        """Events until every prompt's first one went out with its prompt logprobs."""
        pending = set(range(self.info.batch or 1))
        prefill: Any = None
        buffer = b""
        while pending:
            chunk = await self.resp.next_chunk()
            if not chunk:
                if buffer:
                    yield buffer
                return
            buffer += chunk
            out = []
            while b"\n\n" in buffer and pending:
                event, buffer = buffer.split(b"\n\n", 1)
                if event.startswith(b"data: {"):
                    data = orjson.loads(event[6:])
                    index = data.get("index", 0) if isinstance(data, dict) else 0
                    if index in pending:
                        if prefill is None:
                            prefill = orjson.loads(await self.prefill_task)
                        one = prefill[index] if isinstance(prefill, list) and index < len(prefill) else prefill
                        data = merge_prompt_logprobs(data, one)
                        event = b"data: " + orjson.dumps(data)
                        pending.discard(index)
                out.append(event + b"\n\n")
            if out:
                yield b"".join(out)
        if buffer:
            yield buffer


async def route_pd(ctx: RouterContext, path: str, body: dict[str, Any], info: RequestInfo, headers: dict[str, str],
                   request_id: str, deadline: Deadline) -> Answer:
    tokens = info.key.tokens
    tried_p: set[str] = set()
    tried_d: set[str] = set()
    last: Answer | None = None
    for attempt in range(ctx.args.max_attempts):
        if attempt:
            await pause_before_retry(ctx, attempt, path)
        prefills, decodes = ctx.registry.candidates("prefill", tried_p), ctx.registry.candidates("decode", tried_d)
        if not prefills or not decodes:
            return last or error_answer(503, f"no {'prefill' if not prefills else 'decode'} server is available "
                                               "(none healthy, all removed, or their circuit breakers open)",
                                          request_id)
        p = ctx.policies["prefill"].select(prefills, info.key)
        d = ctx.policies["decode"].select(decodes, info.key)
        tried_p.add(p.url)
        tried_d.add(d.url)
        raw = orjson.dumps(with_bootstrap(body, p, info.batch))
        p.started(tokens)
        d.started(tokens)
        pair = [(p, tokens), (d, tokens)]
        prefill_task = asyncio.create_task(fetch_prefill(ctx, p, path, raw, headers, deadline))
        prefill_task.add_done_callback(retrieve)
        resp = None
        try:
            resp = await ctx.client.request("POST", d.url + path, raw, headers, deadline.left())
            if resp.status == 200 and info.stream:
                stream = PDStream(ctx, resp, prefill_task, pair, info)
                stream.watch_prefill()
                resp = None  # the stream owns it now
                return Answer(200, media_type="text/event-stream", headers=answer_headers(stream.resp.headers, request_id),
                              stream=stream.events())
            decode_read = asyncio.ensure_future(resp.read())
            await asyncio.wait([decode_read, prefill_task], return_when=asyncio.FIRST_COMPLETED)
            if prefill_task.done() and isinstance(prefill_task.exception(), PrefillFailed):
                decode_read.cancel()
                raise prefill_task.exception()
            d_body, d_status = await decode_read, resp.status
            media = resp.headers.get("content-type", "application/json")
            passed = answer_headers(resp.headers, request_id)
            if d_status == 200 and info.wants_logprobs:
                merged = merge_prompt_logprobs(orjson.loads(d_body), orjson.loads(await prefill_task))
                d_body = orjson.dumps(merged)
            elif d_status == 200:  # its answer follows its KV write: let it end rather than cut it off
                await asyncio.wait([prefill_task], timeout=min(5.0, deadline.left()))
        except PrefillFailed as e:
            ok_p = e.status < 500
            release(ctx, pair, ok_p, True)
            last = error_answer(e.status, "the prefill server failed: " + e.body.decode(errors="replace")[:500],
                                  request_id)
            if e.status in RETRYABLE:
                continue
            return last
        except asyncio.TimeoutError:
            release(ctx, pair, True, False)
            return error_answer(504, f"no answer within --request-timeout-secs ({deadline.seconds:g} s)",
                                  request_id)
        except (UpstreamError, OSError) as e:
            release(ctx, pair, True, False)
            mark_unreachable(ctx, d, e)
            logger.warning("decode server %s failed: %r", d.url, e)
            last = error_answer(502, f"decode server {d.url} failed: {type(e).__name__}", request_id)
            continue
        except BaseException:  # the client left: closing both connections aborts it on both servers
            release(ctx, pair, True, True)
            raise
        finally:
            if resp is not None:
                resp.close()
                if not prefill_task.done():
                    prefill_task.cancel()
        release(ctx, pair, True, d_status < 500)
        answer = Answer(d_status, d_body, media, passed)
        if d_status not in RETRYABLE:
            return answer
        last = answer
    return last


def retrieve(task: asyncio.Task) -> None:
    """Mark a task's failure as seen (it is reported, or moot, elsewhere)."""
    if not task.cancelled():
        task.exception()


def release(ctx: RouterContext, pair: list[tuple[Worker, int]], ok_prefill: bool, ok_decode: bool) -> None:
    (p, tokens), (d, _) = pair
    ctx.registry.release(p, tokens, ok_prefill)
    ctx.registry.release(d, tokens, ok_decode)
