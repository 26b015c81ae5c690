"""What the router reads from a request body: the text a cache-aware policy matches on, a token
estimate for minimum_tokens, whether it streams, and how many prompts a /generate batch holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from radixserve.router.policies import RouteKey

DEFAULT_MAX_NEW_TOKENS = 128  # a request that names no output budget counts this much
CHARS_PER_TOKEN = 4


@dataclass
class RequestInfo:
    key: RouteKey
    stream: bool
    batch: int | None  # /generate with a list of prompts: how many; else None
    wants_logprobs: bool  # /generate return_logprob (PD: the prompt's come from the prefill server)


def _text_of_content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(_strings(p.get("text") for p in content if isinstance(p, dict)))
    return ""


def _strings(items: Any) -> list[str]:
    """The strings among items: a body is the client's, so any field may hold anything (the worker
    answers a malformed one with its 400; the router only must not fail on it)."""
    return [x for x in items if isinstance(x, str)]


def describe(path: str, body: dict[str, Any]) -> RequestInfo:
    batch = None
    if path == "/generate":
        params = body.get("sampling_params") or {}
        params = params[0] if isinstance(params, list) and params else params
        max_new = params.get("max_new_tokens") if isinstance(params, dict) else None
        text, ids = body.get("text"), body.get("input_ids")
        if isinstance(text, list):
            batch, text = len(text), "".join(_strings(text))
        elif isinstance(ids, list) and ids and isinstance(ids[0], list):
            batch = len(ids)
            ids = [i for row in ids for i in (row if isinstance(row, list) else [row])]
        if isinstance(text, str):
            key_text, prompt_tokens = text, len(text) // CHARS_PER_TOKEN
        elif isinstance(ids, list):
            key_text, prompt_tokens = " ".join(map(str, ids)), len(ids)
        else:
            key_text, prompt_tokens = "", 0
        wants_logprobs = bool(body.get("return_logprob"))
    else:
        max_new = body.get("max_completion_tokens") or body.get("max_tokens")
        if path == "/v1/chat/completions":
            messages = body.get("messages")
            parts = [f"{m.get('role', '')}: {_text_of_content(m.get('content'))}\n"
                     for m in (messages if isinstance(messages, list) else []) if isinstance(m, dict)]
            key_text = "".join(parts)
        else:
            prompt = body.get("prompt")
            key_text = prompt if isinstance(prompt, str) else (
                "".join(_strings(prompt)) if isinstance(prompt, list) else "")
        prompt_tokens = len(key_text) // CHARS_PER_TOKEN
        wants_logprobs = False
    n = body.get("n") if isinstance(body.get("n"), int) else 1
    budget = max_new if isinstance(max_new, int) and max_new >= 0 else DEFAULT_MAX_NEW_TOKENS
    tokens = prompt_tokens + budget * max(1, n) * (batch or 1)  # prompts (all of a batch) + outputs
    return RequestInfo(RouteKey(key_text, tokens), bool(body.get("stream")), batch, wants_logprobs)
