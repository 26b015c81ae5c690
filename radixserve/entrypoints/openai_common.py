"""Pieces shared by the OpenAI completions and chat handlers: sampling-parameter mapping, fan-out of
several requests into one stream, SSE framing, usage, and cancellation when the client leaves."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import aclosing, contextmanager
from typing import Any

import orjson
from fastapi import Request

from radixserve.constrained.schema import GrammarError, schema_text
from radixserve.entrypoints.errors import APIError
from radixserve.entrypoints.openai_protocol import SamplingExtras
from radixserve.entrypoints.tokenizer_manager import (  # noqa: F401 (collect, validate_all re-exported)
    Progress,
    RequestAborted,
    RequestError,
    ServerDeadError,
    TokenizerManager,
    collect,
    validate_all,
)
from radixserve.messages import GenerateReq


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
        ("stop_regex", req.stop_regex),
        ("stop_token_ids", req.stop_token_ids), ("regex", req.regex), ("ebnf", req.ebnf),
        ("logit_bias", req.logit_bias),
    ):
        if theirs is not None:
            p[ours] = theirs
    p.update(ignore_eos=req.ignore_eos, min_new_tokens=req.min_tokens,
             skip_special_tokens=req.skip_special_tokens, no_stop_trim=req.no_stop_trim)
    check_one_constraint(req)
    try:
        if req.json_schema is not None:
            p["json_schema"] = schema_text(req.json_schema, "json_schema")
        fmt = req.response_format
        if fmt is not None and fmt.type == "json_object":
            p["json_schema"] = json.dumps({"type": "object"})
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise APIError(400, "response_format.json_schema.schema is required", "response_format")
            p["json_schema"] = schema_text(fmt.json_schema.schema_, "response_format")
        elif fmt is not None and fmt.type == "structural_tag":
            p["structural_tag"] = schema_text(fmt.model_dump(exclude_none=True, exclude={"json_schema"}),
                                              "response_format")
    except GrammarError as e:  # the message starts with the field at fault
        field = "response_format" if str(e).startswith("response_format") else "json_schema"
        raise APIError(400, str(e), field) from None
    return p


def check_one_constraint(req: SamplingExtras) -> None:
    """regex, ebnf, json_schema and a JSON response_format each constrain the output, and a request
    may have one: say so by the client's names rather than let one silently win over another."""
    fmt = req.response_format
    given = [name for name, value in (("regex", req.regex), ("ebnf", req.ebnf), ("json_schema", req.json_schema))
             if value is not None]
    if fmt is not None and fmt.type != "text":
        given.append("response_format")
    if len(given) > 1:
        raise APIError(400, f"only one of regex, ebnf, json_schema and response_format (json_object or "
                       f"json_schema) may be given, got {' and '.join(given)}", given[-1])


def openai_names(req: SamplingExtras, max_tokens_name: str, prompt_name: str) -> dict[str, str]:
    """The OpenAI field that each native field (in SamplingParams and TokenizerManager errors) came from."""
    names = {"max_new_tokens": max_tokens_name, "min_new_tokens": "min_tokens", "input_ids": prompt_name,
             "prompt": prompt_name, "top_logprobs_num": "top_logprobs" if prompt_name == "messages" else "logprobs"}
    if req.response_format is not None and req.response_format.type != "text":
        names["json_schema"] = names["structural_tag"] = "response_format"
    return names


@contextmanager
def in_client_terms(names: dict[str, str], budget_field: str | None = None) -> Iterator[None]:
    """Request errors raised inside, in the client's terms: the OpenAI field names, in the message
    and as the error's param. budget_field: the API's own name for the output budget, which a length
    error names first (chat's max_completion_tokens, also when the older max_tokens was sent, as
    SGLang's "max_completion_tokens is too large" says)."""
    try:
        yield
    except RequestError as e:
        message = _rename(str(e), names)
        sent = names.get("max_new_tokens", "max_new_tokens")
        if budget_field and budget_field != sent and message.startswith(f"{sent} is too large"):
            message = f"{budget_field} is too large (sent as {sent})" + message[len(f"{sent} is too large"):]
        raise APIError(400, message, names.get(e.param or "", e.param)) from None


def _rename(message: str, names: dict[str, str]) -> str:
    # "prompt" is also a plain word of messages ("the prompt is empty"): it renames the param only
    words = [name for name in names if name != "prompt"]
    pattern = r"\b(" + "|".join(map(re.escape, words)) + r")\b"
    return re.sub(pattern, lambda m: names[m.group(1)], message)


def finish_reason_of(meta: dict[str, Any]) -> str | None:
    """OpenAI's finish_reason: "stop" or "length". An aborted request has none to give: OpenAI
    defines no "abort", so the request ends with an error instead (status 503, the server did not
    finish it; in a stream, an error event), as SGLang does for the aborts its server decides."""
    reason = meta.get("finish_reason")
    if reason is None:
        return None
    if reason["type"] == "abort":
        raise APIError(reason.get("status_code") or 503,
                       f"the request was aborted before it finished: {reason.get('message', 'aborted')}")
    return reason["type"]


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


def usage_options(req: SamplingExtras) -> tuple[bool, bool]:
    """(a final usage chunk, usage on every chunk): stream_options' include_usage and vLLM's
    continuous_usage_stats."""
    opts = req.stream_options
    if opts is None:
        return False, False
    return opts.include_usage, opts.include_usage and opts.continuous_usage_stats


def usage_so_far(req: GenerateReq, res: dict[str, Any] | None) -> dict[str, int]:
    """One choice's usage up to this chunk (continuous_usage_stats)."""
    meta = res["meta_info"] if res is not None else {}
    prompt = meta.get("prompt_tokens", len(req.input_ids))
    completion = meta.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(obj: dict[str, Any] | str) -> bytes:
    if isinstance(obj, str):
        return f"data: {obj}\n\n".encode()
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def merged_streams(tm: TokenizerManager, reqs: list[GenerateReq]) -> AsyncIterator[tuple[int, Progress]]:
    """(request index, live progress) from every request as soon as it arrives. The requests are
    validated before the response starts (validate_all): errors after that are in-band."""
    async with aclosing(tm.run(reqs, validated=True)) as results:
        async for i, p in results:
            yield i, p


class ClientDisconnected(Exception):
    """The client left before its (non-streaming) answer was ready; its requests are aborted."""


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await work, but cancel it (which aborts its requests) as soon as the client goes away, and
    then raise ClientDisconnected: an expected end, not an error. A cancellation of the caller
    itself (server shutdown) still propagates as CancelledError."""
    task = asyncio.ensure_future(work)
    left = False

    async def watch() -> None:
        nonlocal left
        while not task.done():
            if await request.is_disconnected():
                left = True
                task.cancel()
                return
            await asyncio.sleep(0.2)

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if left and not _cancelling():
            raise ClientDisconnected() from None
        raise
    finally:
        watcher.cancel()


def _cancelling() -> bool:
    """Whether someone asked to cancel the running task (Task.cancelling is Python 3.11+)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


def as_api_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, RequestError | ValueError):
        return APIError(400, str(e), getattr(e, "param", None))
    if isinstance(e, RequestAborted):
        return APIError(e.status, e.message)
    if isinstance(e, ServerDeadError):
        return APIError(503, str(e))
    return APIError(500, f"{type(e).__name__}: {e}")


def token_text(tm: TokenizerManager, token_id: int) -> str:
    return tm.tokenizer.decode([token_id])
