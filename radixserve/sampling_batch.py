"""SamplingBatch: the per-row sampling knobs of one decode step as device tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from radixserve.layers.penalties import PenaltyState
from radixserve.sampling_params import SamplingParams
from radixserve.utils.transfer import to_device

# Temperatures below this are treated as greedy: dividing logits by ~0 overflows softmax.
SAMPLING_EPS = 1e-5

_MASK64 = (1 << 64) - 1


def derive_step_seed(seed: int, output_len: int) -> int:
    """Seed for one decode step of a seeded request, from its seed and current output length.

    Depends on nothing else, so a seeded request samples the same tokens whatever it is batched
    with. splitmix64 mixing keeps neighbouring (seed, step) pairs uncorrelated; the result fits
    in 63 bits, which every torch.Generator accepts.
    """
    z = (seed * 0x9E3779B97F4A7C15 + (output_len + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


@dataclass
class SamplingBatch:
    # float32 [5, bs] on the host: temperature (1.0 on greedy rows), top_p (1.0 where off), top_k
    # (vocab_size where off), min_p (0.0 where off), greedy (1.0 / 0.0). Copied to the device on first
    # use, in one copy: an all-greedy batch never needs them (the sampler takes the argmax).
    knobs_host: torch.Tensor
    all_greedy: bool
    # Host-side flags so the sampler skips the sort/filter when no sampled row filters.
    need_top_k: bool
    need_top_p: bool
    need_min_p: bool
    # Largest top_k among sampled rows, or vocab_size if one has none: filtering then needs
    # only a topk of this width instead of a full-vocabulary sort.
    filter_width: int
    penalties: PenaltyState | None  # None: no row has a penalty or a min_new_tokens block
    seeded_rows: list[int]  # sampled (non-greedy) rows that draw from their own generator
    seeds: list[int]  # step seed of each entry of seeded_rows
    vocab_size: int
    device: torch.device
    # logit_bias of every row that has one, as (row, token id, bias) triples; None if no row has any
    logit_bias: tuple[list[int], list[int], list[float]] | None = None
    _knobs: torch.Tensor | None = field(default=None, repr=False)

    @property
    def knobs(self) -> torch.Tensor:
        if self._knobs is None:
            self._knobs = to_device(self.knobs_host, self.device)
        return self._knobs

    def apply_logit_bias(self, logits: torch.Tensor) -> torch.Tensor:
        """logits with each row's bias added (a new tensor; logits itself is left as it is)."""
        if self.logit_bias is None:
            return logits
        rows, ids, values = self.logit_bias
        index = to_device(torch.tensor([rows, ids], dtype=torch.int64), self.device)
        bias = to_device(torch.tensor(values, dtype=logits.dtype), self.device)
        return logits.index_put((index[0], index[1]), bias, accumulate=True)

    @property
    def temperatures(self) -> torch.Tensor:  # float32 [bs, 1]
        return self.knobs[0].view(-1, 1)

    @property
    def top_ps(self) -> torch.Tensor:  # float32 [bs]
        return self.knobs[1]

    @property
    def top_ks(self) -> torch.Tensor:  # int64 [bs]
        return self.knobs[2].to(torch.int64)

    @property
    def min_ps(self) -> torch.Tensor:  # float32 [bs]
        return self.knobs[3]

    @property
    def is_greedy(self) -> torch.Tensor:  # bool [bs]
        return self.knobs[4] > 0.5

    @property
    def batch_size(self) -> int:
        return int(self.knobs_host.shape[1])

    @property
    def need_filter(self) -> bool:
        return self.need_top_k or self.need_top_p or self.need_min_p

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        output_ids: Sequence[Sequence[int]],
        prompt_ids: Sequence[Sequence[int]],
        eos_ids: Sequence[Sequence[int]],
        step_seeds: Sequence[int | None],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingBatch:
        bs = len(params)
        for name, seq in (
            ("output_ids", output_ids),
            ("prompt_ids", prompt_ids),
            ("eos_ids", eos_ids),
            ("step_seeds", step_seeds),
        ):
            if len(seq) != bs:
                raise ValueError(f"{name} has {len(seq)} rows, expected {bs}")
        device = torch.device(device)
        temps: list[float] = []
        top_ps: list[float] = []
        top_ks: list[float] = []
        min_ps: list[float] = []
        greedy: list[float] = []
        seeded_rows: list[int] = []
        seeds: list[int] = []
        for i, p in enumerate(params):
            is_greedy = p.is_greedy or p.temperature < SAMPLING_EPS
            greedy.append(1.0 if is_greedy else 0.0)
            if is_greedy:
                # Neutral knobs: greedy rows take the argmax; their sampled draw is discarded.
                temps.append(1.0)
                top_ps.append(1.0)
                top_ks.append(float(vocab_size))
                min_ps.append(0.0)
                continue
            temps.append(p.temperature)
            top_ps.append(p.top_p)
            top_ks.append(float(min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size))
            min_ps.append(p.min_p)
            seed = step_seeds[i]
            if seed is not None:
                seeded_rows.append(i)
                seeds.append(int(seed))
        # all per-row knobs in one tensor, for one copy (ids up to 2^24 are exact in float32)
        packed = torch.tensor([temps, top_ps, top_ks, min_ps, greedy], dtype=torch.float32).reshape(5, bs)
        penalties = PenaltyState.build(params, output_ids, prompt_ids, eos_ids, vocab_size, device)
        bias_rows: list[int] = []
        bias_ids: list[int] = []
        bias_values: list[float] = []
        for i, p in enumerate(params):
            for token, value in (p.logit_bias or {}).items():
                if token < vocab_size:  # the server rejects others; the guard keeps an index in range
                    bias_rows.append(i)
                    bias_ids.append(token)
                    bias_values.append(value)
        return cls(
            knobs_host=packed,
            all_greedy=all(g > 0.5 for g in greedy),
            need_top_k=any(k < vocab_size for k in top_ks),
            need_top_p=any(t < 1.0 for t in top_ps),
            need_min_p=any(m > 0.0 for m in min_ps),
            filter_width=int(max((k for k, g in zip(top_ks, greedy) if g < 0.5), default=vocab_size)),
            penalties=penalties,
            seeded_rows=seeded_rows,
            seeds=seeds,
            vocab_size=vocab_size,
            device=device,
            logit_bias=(bias_rows, bias_ids, bias_values) if bias_rows else None,
        )
