"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary.

Under DP attention (without --enable-dp-lm-head) the LM head's slices are over the whole world: the
DP groups' hidden states are gathered, every rank projects them onto its slice, and each group keeps
its own rows of the gathered logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.distributed.dp_attention import gather_groups, gather_per_group, lm_head_spans_world
from radixserve.distributed.parallel_state import (
    get_tp_rank,
    get_tp_size,
    get_world,
    tp_all_gather_last_dim,
    tp_all_reduce,
)
from radixserve.layers.gemv import linear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, over_world: bool = False) -> None:
        super().__init__()
        self.over_world = over_world
        self.tp_rank, self.tp_size = (get_world().tp_rank, get_world().tp_size) if over_world else (
            get_tp_rank(), get_tp_size())
        self.vocab_size = vocab_size
        self.per_rank = (vocab_size + self.tp_size - 1) // self.tp_size
        self.start = self.tp_rank * self.per_rank
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        rows = loaded[self.start : self.start + self.per_rank]
        param.data.zero_()
        param.data[: rows.shape[0]].copy_(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to vocabulary logits; the slices of all ranks are gathered. Split over the
    TP group, or over the world under DP attention without --enable-dp-lm-head."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__(vocab_size, hidden, over_world=lm_head_spans_world())

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every rank of the world calls this the same number of times per forward when over_world."""
        if not self.over_world:
            return tp_all_gather_last_dim(linear(hidden, self.weight))[..., : self.vocab_size]
        rows, own = gather_groups(hidden, gather_per_group(hidden.shape[0]))
        logits = tp_all_gather_last_dim(linear(rows, self.weight), over_world=True)
        return logits[own, : self.vocab_size]
