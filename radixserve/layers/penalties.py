"""Logit penalties: repetition (HF), frequency/presence (OpenAI) and min_new_tokens blocking.

The state is rebuilt per step from the token lists and only when some row needs it, so a batch
without penalties pays nothing. Counting is one scatter_add over a flat index of every row's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from radixserve.sampling_params import SamplingParams


@dataclass
class PenaltyState:
    """Device tensors for one decode step; a None group means no row of the batch uses it."""

    repetition_penalties: torch.Tensor | None = None  # float32 [bs, 1], 1.0 where unused
    seen_mask: torch.Tensor | None = None  # bool [bs, V], token occurs in prompt + output
    frequency_penalties: torch.Tensor | None = None  # float32 [bs, 1]
    presence_penalties: torch.Tensor | None = None  # float32 [bs, 1]
    output_counts: torch.Tensor | None = None  # float32 [bs, V], occurrences in the output
    block_rows: torch.Tensor | None = None  # int64 [m], with block_ids: entries forced to -inf
    block_ids: torch.Tensor | None = None  # int64 [m]

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        output_ids: Sequence[Sequence[int]],
        prompt_ids: Sequence[Sequence[int]],
        eos_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str,
    ) -> PenaltyState | None:
        """Return the state for this batch, or None when no row has an active penalty."""
        state = cls()
        used = False
        rep = [p.repetition_penalty for p in params]
        if any(r != 1.0 for r in rep):
            used = True
            # Rows without a repetition penalty contribute no tokens: less to count and copy.
            seen_lists = [
                list(chain(prompt_ids[i], output_ids[i])) if rep[i] != 1.0 else [] for i in range(len(params))
            ]
            state.repetition_penalties = _column(rep, device)
            state.seen_mask = token_counts(seen_lists, vocab_size, device) > 0
        freq = [p.frequency_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        if any(f != 0.0 for f in freq) or any(p != 0.0 for p in pres):
            used = True
            out_lists = [
                output_ids[i] if (freq[i] != 0.0 or pres[i] != 0.0) else [] for i in range(len(params))
            ]
            state.frequency_penalties = _column(freq, device)
            state.presence_penalties = _column(pres, device)
            state.output_counts = token_counts(out_lists, vocab_size, device)
        rows: list[int] = []
        ids: list[int] = []
        for i, p in enumerate(params):
            if len(output_ids[i]) < p.min_new_tokens:
                for tok in set(chain(eos_ids[i], p.stop_token_ids or ())):
                    if 0 <= tok < vocab_size:
                        rows.append(i)
                        ids.append(tok)
        if rows:
            used = True
            state.block_rows = torch.tensor(rows, dtype=torch.int64).to(device)
            state.block_ids = torch.tensor(ids, dtype=torch.int64).to(device)
        return state if used else None


def _column(values: list[float], device: torch.device | str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1).to(device)


def token_counts(lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """float32 [len(lists), vocab_size]: how often each token id occurs in each row's list.

    Ids outside [0, vocab_size) (e.g. tokenizer-only added tokens) land in a spare column that is
    sliced off, so no host-side filtering or device sync is needed.
    """
    bs = len(lists)
    width = vocab_size + 1
    counts = torch.zeros(bs * width, dtype=torch.float32, device=device)
    sizes = [len(x) for x in lists]
    total = sum(sizes)
    if total > 0:
        lengths = torch.tensor(sizes, dtype=torch.int64)
        flat = torch.tensor(list(chain.from_iterable(lists)), dtype=torch.int64)
        rows = torch.repeat_interleave(torch.arange(bs, dtype=torch.int64), lengths)
        valid = (flat >= 0) & (flat < vocab_size)
        index = rows * width + torch.where(valid, flat, torch.full_like(flat, vocab_size))
        index = index.to(device)
        counts.scatter_add_(0, index, torch.ones(total, dtype=torch.float32, device=device))
    return counts.view(bs, width)[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, state: PenaltyState) -> torch.Tensor:
    """Return penalized float32 logits [bs, V]; the input tensor is left untouched."""
    if state.seen_mask is not None and state.repetition_penalties is not None:
        penalty = state.repetition_penalties
        # HF semantics: shrink positive logits, push negative ones further down.
        scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(state.seen_mask, scaled, logits)
    if state.output_counts is not None:
        counts = state.output_counts
        assert state.frequency_penalties is not None and state.presence_penalties is not None
        logits = (
            logits
            - state.frequency_penalties * counts
            - state.presence_penalties * (counts > 0).to(logits.dtype)
        )
    if state.block_rows is not None and state.block_ids is not None:
        neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
        logits = logits.index_put((state.block_rows, state.block_ids), neg_inf)
    return logits
