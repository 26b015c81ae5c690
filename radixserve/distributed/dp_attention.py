"""DP attention (--enable-dp-attention): dp_size attention groups under one MoE world.

Each group of tp_size / dp_size ranks runs its own scheduler, requests and KV cache; its attention,
embedding and dense layers are split over the group only (parallel_state's TP group). The MoE layers
span every rank: before one, the groups' hidden states are gathered over the world (groups hold
different token counts: each pads to the largest and the counts say which rows are real), the experts
run split over the world as without DP attention, and after the world's sum each group takes its own
rows back. The LM head splits the vocabulary over the world the same way, or, with
--enable-dp-lm-head, over the group (no gather).

Those world collectives need every rank in each forward, so the groups step in lockstep: before each
forward every rank says how many tokens its group runs (`sync_step`, over gloo); a group with nothing
to run joins with an idle pass that only takes part in the world collectives, and when every group is
idle nobody runs a forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from radixserve.distributed.parallel_state import get_world


@dataclass(frozen=True)
class DPAttention:
    dp_size: int
    dp_rank: int
    attn_tp_size: int
    dp_lm_head: bool  # the LM head split over the group, not the world


_DP: DPAttention | None = None
# tokens of each group in the forward under way (set by sync_step)
_TOKENS_PER_GROUP: list[int] = []


def set_dp_attention(dp_size: int, dp_rank: int, attn_tp_size: int, dp_lm_head: bool) -> None:
    global _DP
    _DP = DPAttention(dp_size, dp_rank, attn_tp_size, dp_lm_head)


def get_dp_attention() -> DPAttention | None:
    return _DP


def lm_head_spans_world() -> bool:
    """Whether the LM head splits the vocabulary over the world (DP attention without --enable-dp-lm-head)."""
    return _DP is not None and not _DP.dp_lm_head and _DP.dp_size > 1


def gather_per_group(value: int) -> list[int]:
    """Each group's value (its rank 0's), over the world's gloo group."""
    world, dp = get_world(), _DP
    mine = torch.tensor([value], dtype=torch.int64)
    parts = [torch.empty_like(mine) for _ in range(world.tp_size)]
    dist.all_gather(parts, mine, group=world.cpu_group)
    return [int(parts[g * dp.attn_tp_size].item()) for g in range(dp.dp_size)]


def sync_step(num_tokens: int) -> list[int]:
    """Every rank, once a step: the tokens its group runs now (0: idle). Returns every group's."""
    global _TOKENS_PER_GROUP
    _TOKENS_PER_GROUP = gather_per_group(num_tokens)
    return _TOKENS_PER_GROUP


def gather_groups(x: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, slice]:
    """Every group's rows of x ([n, ...], n = counts[group]) in group order, and the slice of ours. All
    ranks of a group hold the same rows: the world all-gather takes each group's rank-0 copy."""
    world, dp = get_world(), _DP
    longest = max(counts)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world.tp_size)]
    dist.all_gather(parts, padded, group=world.group)
    rows = torch.cat([parts[g * dp.attn_tp_size][: counts[g]] for g in range(dp.dp_size)])
    start = sum(counts[: dp.dp_rank])
    return rows, slice(start, start + counts[dp.dp_rank])


def gather_for_moe(x: torch.Tensor) -> tuple[torch.Tensor, slice | None]:
    """The tokens a MoE layer runs on: every group's (DP attention), else this rank's own."""
    if _DP is None:
        return x, None
    return gather_groups(x, _TOKENS_PER_GROUP)


def own_rows(x: torch.Tensor, own: slice | None) -> torch.Tensor:
    return x if own is None else x[own]
