"""Pieces shared by the OpenAI completions and chat handlers: sampling-parameter mapping, fan-out of
several requests into one stream, SSE framing, usage, and cancellation when the client leaves."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import orjson
from fastapi import Request

from radixserve.entrypoints.errors import APIError
from radixserve.entrypoints.openai_protocol import SamplingExtras
from radixserve.entrypoints.tokenizer_manager import (  # noqa: F401 (collect, validate_all re-exported)
    RequestError,
    SingleRequest,
    TokenizerManager,
    collect,
    validate_all,
)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sampling_params_of(req: SamplingExtras, max_tokens: int | None) -> dict[str, Any]:
    """OpenAI request fields -> radixserve sampling params (unset fields keep radixserve's defaults)."""
    p: dict[str, Any] = {"max_new_tokens": max_tokens, "n": req.n}
    for ours, theirs in (
        ("temperature", req.temperature), ("top_p", req.top_p), ("top_k", req.top_k), ("min_p", req.min_p),
        ("presence_penalty", req.presence_penalty), ("frequency_penalty", req.frequency_penalty),
        ("repetition_penalty", req.repetition_penalty), ("seed", req.seed), ("stop", req.stop),
        ("stop_token_ids", req.stop_token_ids), ("regex", req.regex), ("ebnf", req.ebnf),
        ("logit_bias", req.logit_bias),
    ):
        if theirs is not None:
            p[ours] = theirs
    p.update(ignore_eos=req.ignore_eos, min_new_tokens=req.min_tokens,
             skip_special_tokens=req.skip_special_tokens, no_stop_trim=req.no_stop_trim)
    if req.json_schema is not None:
        p["json_schema"] = req.json_schema if isinstance(req.json_schema, str) else json.dumps(req.json_schema)
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        p["json_schema"] = json.dumps({"type": "object"})
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format.json_schema.schema is required", "response_format")
        p["json_schema"] = json.dumps(fmt.json_schema.schema_)
    return p


def finish_reason_of(meta: dict[str, Any]) -> str | None:
    reason = meta.get("finish_reason")
    if reason is None:
        return None
    return {"stop": "stop", "length": "length"}.get(reason["type"], reason["type"])


def matched_stop_of(meta: dict[str, Any]) -> int | str | None:
    reason = meta.get("finish_reason") or {}
    return reason.get("matched") if reason.get("type") == "stop" else None


def usage_of(results: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Prompt tokens count once per prompt (not per sample); completion tokens for every sample."""
    firsts = results[::n]
    prompt = sum(r["meta_info"]["prompt_tokens"] for r in firsts)
    cached = sum(r["meta_info"]["cached_tokens"] for r in firsts)
    completion = sum(r["meta_info"]["completion_tokens"] for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def sse(obj: dict[str, Any] | str) -> bytes:
    if isinstance(obj, str):
        return f"data: {obj}\n\n".encode()
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def merged_streams(
    tm: TokenizerManager, reqs: list[SingleRequest]
) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """(request index, cumulative result) from every request as soon as it arrives. Validate the
    requests before the response starts (see validate_all): errors after that are in-band."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, r: SingleRequest) -> None:
        try:
            async for out in tm.generate(r):
                await queue.put((i, out))
        except Exception as e:  # surfaced to the consumer
            await queue.put((i, e))
        await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(reqs)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await work, but cancel it (which aborts its requests) as soon as the client goes away."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not task.done():
            if await request.is_disconnected():
                task.cancel()
                return
            await asyncio.sleep(0.2)

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    finally:
        watcher.cancel()


def as_api_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, RequestError | ValueError):
        return APIError(400, str(e))
    return APIError(500, f"{type(e).__name__}: {e}")


def token_text(tm: TokenizerManager, token_id: int) -> str:
    return tm.tokenizer.decode([token_id])
