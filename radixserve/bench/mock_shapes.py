"""Request parsing and response bodies of the mock worker, in the shapes of radixserve's (and SGLang's)
/generate and of the OpenAI completions and chat endpoints. No tokenizer: a prompt of text counts
ceil(chars / 4) tokens, and token i of an answer is always TOKEN_TEXT with id TOKEN_ID0 + i.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

TOKEN_TEXT = " t"
TOKEN_ID0 = 1000
_IDS = list(range(TOKEN_ID0, TOKEN_ID0 + 4096))


@dataclass
class Prompt:
    """One sequence to generate for (a batch request has several)."""

    chars: int
    tokens: int
    max_new_tokens: int


def text_tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


def output_ids(n: int) -> list[int]:
    return _IDS[:n] if n <= len(_IDS) else list(range(TOKEN_ID0, TOKEN_ID0 + n))


def _prompt(item: Any, max_new: int) -> Prompt:
    if isinstance(item, str):
        return Prompt(len(item), text_tokens(item), max_new)
    if isinstance(item, list):  # token ids
        return Prompt(0, len(item), max_new)
    raise ValueError("a prompt must be text or a list of token ids")


def _max_new(value: Any, default: int) -> int:
    if value is None:
        return default
    n = int(value)
    if n < 0:
        raise ValueError("max_new_tokens must be >= 0")
    return n


def parse_generate(body: dict[str, Any], default_tokens: int) -> tuple[list[Prompt], bool]:
    """(prompts, single) of a native /generate body; single: answer an object, not a list."""
    text, ids = body.get("text"), body.get("input_ids")
    if text is not None:
        single = isinstance(text, str)
        items = [text] if single else list(text)
    elif ids is not None:
        single = not ids or not isinstance(ids[0], list)
        items = [ids] if single else list(ids)
    else:
        raise ValueError("give text or input_ids")
    sp = body.get("sampling_params") or {}
    sps = sp if isinstance(sp, list) else [sp] * len(items)
    if len(sps) != len(items):
        raise ValueError("sampling_params must be one dict or one per prompt")
    prompts = [_prompt(it, _max_new(s.get("max_new_tokens"), default_tokens)) for it, s in zip(items, sps)]
    return prompts, single


def parse_completion(body: dict[str, Any], default_tokens: int) -> Prompt:
    prompt = body.get("prompt")
    if prompt is None:
        raise ValueError("give prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = "".join(prompt)  # several prompts: answered as one choice (enough for a mock)
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        prompt = [t for p in prompt for t in p]
    return _prompt(prompt, _max_new(body.get("max_tokens"), default_tokens))


def parse_chat(body: dict[str, Any], default_tokens: int) -> Prompt:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("give messages")
    chars = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    return Prompt(chars, max(1, (chars + 3) // 4), _max_new(limit, default_tokens))


# ---- native /generate -----------------------------------------------------------------------
def generate_result(rid: str, p: Prompt, done: int, finished: bool, start: float, worker: str,
                    aborted: bool = False) -> dict[str, Any]:
    """The result after `done` tokens; a stream sends it whole each time, as SGLang does."""
    if aborted:
        finish: Any = {"type": "abort", "message": "aborted by /abort_request"}
    else:
        finish = {"type": "length", "length": done} if finished else None
    return {"text": TOKEN_TEXT * done, "output_ids": output_ids(done),
            "meta_info": {"id": rid, "prompt_tokens": p.tokens, "completion_tokens": done, "cached_tokens": 0,
                          "finish_reason": finish, "e2e_latency": time.perf_counter() - start,
                          "worker": worker}}


# ---- OpenAI ---------------------------------------------------------------------------------
def usage(p: Prompt, done: int) -> dict[str, int]:
    return {"prompt_tokens": p.tokens, "completion_tokens": done, "total_tokens": p.tokens + done}


def finish_reason(aborted: bool) -> str:
    return "abort" if aborted else "length"


def completion(rid: str, model: str, p: Prompt, worker: str, aborted: bool, done: int) -> dict[str, Any]:
    choice = {"index": 0, "text": TOKEN_TEXT * done, "logprobs": None,
              "finish_reason": finish_reason(aborted), "matched_stop": None}
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage(p, done), "worker": worker}


def completion_chunk(rid: str, model: str, text: str, finish: str | None, worker: str) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "worker": worker}


def chat(rid: str, model: str, p: Prompt, worker: str, aborted: bool, done: int) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", "content": TOKEN_TEXT * done, "tool_calls": None},
              "logprobs": None, "finish_reason": finish_reason(aborted), "matched_stop": None}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage(p, done), "worker": worker}


def chat_chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None,
               worker: str) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            "worker": worker}


def usage_chunk(rid: str, model: str, obj: str, p: Prompt, done: int, worker: str) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(p, done), "worker": worker}
