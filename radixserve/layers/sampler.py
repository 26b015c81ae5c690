"""Sampler: penalties, greedy/temperature/top-k/top-p/min-p sampling and logprobs, batched on device.

No host sync happens here: every branch is decided by host flags precomputed in SamplingBatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixserve.layers.penalties import apply_penalties
from radixserve.sampling_batch import SamplingBatch


@dataclass
class SamplerOutput:
    next_token_ids: torch.Tensor  # int64 [bs]
    # float32 [bs]: logprob of the chosen token under the raw logits (log_softmax of the model
    # output, before penalties/temperature). None when return_logprob is False.
    next_token_logprobs: torch.Tensor | None
    # (values float32 [bs, k], ids int64 [bs, k]) from the raw log_softmax, sorted descending;
    # None when max_top_k == 0.
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None


class Sampler:
    def __call__(
        self,
        logits: torch.Tensor,
        batch: SamplingBatch,
        return_logprob: bool,
        max_top_k: int = 0,
    ) -> SamplerOutput:
        raw = logits.float()  # no copy when already float32; never modified in place
        penalized = apply_penalties(raw, batch.penalties) if batch.penalties is not None else raw
        penalized = batch.apply_logit_bias(penalized)  # logprobs below stay the model's own
        if batch.all_greedy:
            next_ids = penalized.argmax(dim=-1)
        else:
            next_ids = _sample(penalized, batch)

        chosen_logprobs = None
        top = None
        if return_logprob or max_top_k > 0:
            logprobs = torch.log_softmax(raw, dim=-1)
            if return_logprob:
                chosen_logprobs = logprobs.gather(1, next_ids.unsqueeze(1)).squeeze(1)
            if max_top_k > 0:
                values, ids = logprobs.topk(min(max_top_k, logprobs.shape[-1]), dim=-1, sorted=True)
                top = (values, ids)
        return SamplerOutput(next_token_ids=next_ids, next_token_logprobs=chosen_logprobs, top_logprobs=top)


def _sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mixed batch: sample every row, then let greedy rows take their argmax instead."""
    probs = torch.softmax(logits / batch.temperatures, dim=-1)
    if batch.need_filter:
        probs = _filter_probs(probs, batch)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p / sum(p), so the filtered
    # probabilities need no renormalization (a per-row scale does not move the argmax).
    noise = _exponential_noise(probs, batch)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(batch.is_greedy, logits.argmax(dim=-1), sampled)


def _filter_probs(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Zero the probabilities removed by top-k, then top-p, then min-p; the top token always stays.

    Filtering happens in sorted order but the result is scattered back to vocabulary order so
    that the random draw never depends on whether this batch took the sort path. Rows whose
    knobs are all off are left bit-exact (such rows force the full sort: filter_width == V).
    """
    if batch.filter_width < probs.shape[-1]:
        # Every sampled row keeps at most filter_width tokens: a partial topk beats a full sort.
        sorted_p, order = probs.topk(batch.filter_width, dim=-1, sorted=True)
    else:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    if batch.need_top_k:
        ranks = torch.arange(sorted_p.shape[-1], device=probs.device)
        sorted_p = sorted_p.masked_fill(ranks.unsqueeze(0) >= batch.top_ks.unsqueeze(1), 0.0)
    if batch.need_top_p:
        cum = sorted_p.cumsum(dim=-1)
        # top_p applies to the top-k renormalized distribution, as in HF: compare against
        # top_p * kept mass. A token goes once the mass strictly before it reaches top_p, which
        # keeps the smallest prefix whose mass is >= top_p (and always the first token).
        kept_mass = cum[:, -1:]
        drop = (cum - sorted_p) >= batch.top_ps.unsqueeze(1) * kept_mass
        drop &= (batch.top_ps < 1.0).unsqueeze(1)  # top_p == 1: no cumsum rounding can drop a tail
        sorted_p = sorted_p.masked_fill(drop, 0.0)
    if batch.need_min_p:
        threshold = batch.min_ps.unsqueeze(1) * sorted_p[:, :1]
        sorted_p = sorted_p.masked_fill(sorted_p < threshold, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_p)


def _exponential_noise(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    noise = torch.empty_like(probs)
    if len(batch.seeded_rows) < probs.shape[0]:
        noise.exponential_()  # unseeded rows: torch's default generator
    for row, seed in zip(batch.seeded_rows, batch.seeds):
        # A fresh generator per seeded row and step: its noise depends only on (seed, vocab size).
        gen = torch.Generator(device=probs.device)
        gen.manual_seed(seed)
        noise[row].exponential_(generator=gen)
    # Exp(1) may return exactly 0 on some backends; p / 0 would give NaN for filtered tokens.
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)
