"""How long a request may be: the model's context length and the KV pool's capacity.

The API process checks these before a request is sent (a 400 naming the field,
entrypoints/validation.py); the scheduler resolves max_new_tokens against them. The wording carries the
phrases clients match on: OpenAI's and vLLM's "maximum context length", SGLang's "is longer than the
model's context length" and "max_completion_tokens is too large".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestLimits:
    context_len: int
    kv_capacity: int  # tokens the KV pool holds (whole pages)

    def check(self, prompt_len: int, max_new_tokens: int | None) -> tuple[str, str] | None:
        """(message, field at fault) when the request can never run, else None."""
        n, ctx = prompt_len, self.context_len
        if n >= ctx:
            return (f"The input ({n} tokens) is longer than the model's context length ({ctx} tokens). "
                    f"This model's maximum context length is {ctx} tokens, and the prompt must leave room "
                    "for at least one generated token.", "prompt")
        if max_new_tokens is not None and n + max_new_tokens > ctx:
            return (f"max_new_tokens is too large: {max_new_tokens}. This model's maximum context length is "
                    f"{ctx} tokens. However, you requested {n + max_new_tokens} tokens ({n} in the prompt, "
                    f"{max_new_tokens} in max_new_tokens). Please reduce the length of the prompt or "
                    "max_new_tokens.", "max_new_tokens")
        if n >= self.kv_capacity:
            # the pool, not the model, is the limit here: a server-side setting
            return (f"The input ({n} tokens) does not fit in the KV cache, which holds {self.kv_capacity} "
                    "tokens on this server (--max-total-tokens, --mem-fraction-static): no request longer "
                    f"than {self.kv_capacity - 1} prompt tokens can run.", "prompt")
        return None

    def max_new_tokens(self, prompt_len: int, asked: int | None) -> int:
        """The output budget: what was asked (None: up to the context length), clipped to what the KV
        pool can ever hold beside the prompt, as SGLang clips it. A clipped request ends with
        finish_reason "length" when the pool is its limit, instead of waiting for room that never comes."""
        room = min(self.context_len, self.kv_capacity) - prompt_len
        return room if asked is None else min(asked, room)
