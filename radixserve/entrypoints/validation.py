"""Checking requests, in the API process: the one place a request is validated. Its sampling params
were parsed as the request was made (requests.py); here its text is tokenized and the request is
checked against the model (vocabulary, context length, KV pool, logprob cap). The scheduler trusts
what reaches it: every request comes through a tokenizer manager, and the message's types are
checked as it is decoded."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from radixserve.entrypoints.request_errors import RequestError, check_text
from radixserve.messages import GenerateReq
from radixserve.request_limits import RequestLimits

VALIDATE_BATCH = 256  # requests validated between yields to the event loop (/health stays live)


@dataclass
class RequestValidator:
    tokenizer: Any  # None for a config-only model: prompts must come as token ids
    vocab_size: int
    limits: RequestLimits
    max_logprobs: int = 20  # top logprobs per token; -1: no cap

    def encode(self, text: str, field: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of client text; field names the text in the error when it cannot be encoded."""
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer: send input_ids instead of text", field)
        check_text(text, field)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise RequestError("the prompt is empty", "prompt")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise RequestError(f"input_ids must be token ids in [0, {self.vocab_size})", "input_ids")

    def check(self, req: GenerateReq) -> None:
        """What depends on the request's prompt length and options (its prompt is checked apart)."""
        params = req.sampling_params
        problem = self.limits.check(len(req.input_ids), params.max_new_tokens)
        if problem is not None:
            raise RequestError(*problem)
        if req.return_logprob and req.logprob_start_len >= len(req.input_ids):
            raise RequestError(f"logprob_start_len ({req.logprob_start_len}) must be less than the number of "
                               f"prompt tokens ({len(req.input_ids)})", "logprob_start_len")
        if req.top_logprobs_num < 0:
            raise RequestError("top_logprobs_num must be >= 0", "top_logprobs_num")
        if 0 <= self.max_logprobs < req.top_logprobs_num:
            raise RequestError(f"top_logprobs_num must be at most {self.max_logprobs} (--max-logprobs), "
                               f"got {req.top_logprobs_num}", "top_logprobs_num")
        # stop_token_ids past the vocabulary are kept, as vLLM and SGLang keep them: they can
        # never be sampled, so they never stop anything (clients share one list across models).
        for t in params.logit_bias or {}:
            if t >= self.vocab_size:
                raise RequestError(f"logit_bias keys must be token ids in [0, {self.vocab_size})", "logit_bias")
        if self.tokenizer is None and (params.stop or params.stop_regex or params.grammar_spec() is not None):
            raise RequestError("stop strings and structured output need a tokenizer; this model has none")

    async def prepare(self, reqs: list[GenerateReq]) -> None:
        """Tokenize and check every request before any runs, so that one bad prompt fails the whole
        call cleanly. A call's n samples share their prompt, so each distinct prompt is tokenized
        and checked once; a large call yields to the event loop as it goes."""
        ids_of_text: dict[str, list[int]] = {}
        checked: dict[int, list[int]] = {}  # id of a checked list -> the list (kept alive: ids stay unique)
        for k, r in enumerate(reqs):
            if r.text is not None:
                ids = ids_of_text.get(r.text)
                if ids is None:
                    ids = ids_of_text[r.text] = self.encode(r.text, "text")
                r.input_ids, r.text = ids, None
            if id(r.input_ids) not in checked:
                self.check_prompt(r.input_ids)
                checked[id(r.input_ids)] = r.input_ids
            self.check(r)
            if k % VALIDATE_BATCH == VALIDATE_BATCH - 1:
                await asyncio.sleep(0)
