"""Logits for the positions that need them: each request's last token, plus every prompt position
of requests that asked for prompt logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from radixserve.layers.embedding import ParallelLMHead
    from radixserve.model_executor.forward_batch import ForwardBatch


@dataclass
class PromptLogprobs:
    """Per request index: logprob of each following prompt token, and optional top-k."""

    token_logprobs: list[float]
    top_values: list[list[float]] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)


@dataclass
class LogitsOutput:
    next_token_logits: torch.Tensor  # [bs, V] float32
    prompt_logprobs: dict[int, PromptLogprobs] = field(default_factory=dict)


def compute_logits(
    hidden: torch.Tensor, lm_head: ParallelLMHead, batch: ForwardBatch, prompt_top_k: int = 0
) -> LogitsOutput:
    """hidden: [T, H] final-normed states."""
    if batch.is_decode:
        return LogitsOutput(lm_head.compute_logits(hidden).float())
    spans = batch.prompt_logprob_spans
    if getattr(lm_head, "over_world", False) and spans:
        # an LM head over the DP-attention world runs once per forward on every rank: all rows at once
        pieces = [hidden[batch.logits_indices]] + [hidden[a:b] for _, a, b in spans]
        span_logits = list(lm_head.compute_logits(torch.cat(pieces)).split([len(p) for p in pieces]))
        last = span_logits.pop(0).float()
    else:
        last = lm_head.compute_logits(hidden[batch.logits_indices]).float()
        span_logits = None
    out = LogitsOutput(last)
    for i, (req_index, a, b) in enumerate(spans):
        logits = span_logits[i] if span_logits is not None else lm_head.compute_logits(hidden[a:b])
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        next_ids = batch.prompt_next_ids[a:b]
        known = next_ids >= 0
        picked = logprobs.gather(1, next_ids.clamp(min=0)[:, None]).squeeze(1)
        entry = PromptLogprobs(picked[known].tolist())
        if prompt_top_k > 0:  # a request may ask for more alternatives than the vocabulary has
            values, ids = logprobs[known].topk(min(prompt_top_k, logprobs.shape[-1]), dim=-1)
            entry.top_values, entry.top_ids = values.tolist(), ids.tolist()
        out.prompt_logprobs[req_index] = entry
    return out
