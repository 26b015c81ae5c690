"""FusedMoE: a layer's experts as two stacked tensors, split over tensor- and expert-parallel ranks.

w13 [E_local, 2 N_local, H] holds each expert's gate rows then up rows; w2 [E_local, H, N_local] its
down projection. With --ep-size 1 every rank holds every expert and a 1/tp slice of each expert's
intermediate dim (N); with --ep-size P the experts are dealt out in P contiguous runs and each run's N
is split over the tp/P ranks that share it. Either way a rank's output is a partial sum over its
slices and experts, and one all-reduce over the TP group finishes it (the caller's, so that a shared
expert's partial sum rides in the same reduction).
"""

from __future__ import annotations

import torch
from torch import nn

from radixserve.distributed.parallel_state import get_moe_parallel, get_tp_rank, get_tp_size
from radixserve.layers.moe.torch_moe import moe_experts_torch

try:
    from radixserve.layers.moe.triton_moe import fused_experts_triton, takes_triton_moe
except ImportError:  # the kernel module is optional on CPU-only installs
    fused_experts_triton = None

    def takes_triton_moe(x: torch.Tensor) -> bool:
        return False


# checkpoint expert projection -> (our tensor, which rows of it)
EXPERT_PROJECTIONS = {
    "w1": ("w13", "gate"), "gate_proj": ("w13", "gate"),
    "w3": ("w13", "up"), "up_proj": ("w13", "up"),
    "w2": ("w2", "down"), "down_proj": ("w2", "down"),
}


def expert_split(num_experts: int, intermediate: int) -> tuple[int, int, int, int]:
    """(first local expert, local experts, first intermediate column, local intermediate columns)."""
    tp_size, tp_rank, ep_size = get_tp_size(), get_tp_rank(), get_moe_parallel().ep_size
    if num_experts % ep_size:
        raise ValueError(f"--ep-size {ep_size} does not divide the model's {num_experts} experts")
    moe_tp = tp_size // ep_size
    if intermediate % moe_tp:
        raise ValueError(
            f"the experts' intermediate size ({intermediate}) is not divisible by --tp-size / --ep-size ({moe_tp})"
        )
    per_rank, n_local = num_experts // ep_size, intermediate // moe_tp
    ep_rank, moe_tp_rank = divmod(tp_rank, moe_tp)
    return ep_rank * per_rank, per_rank, moe_tp_rank * n_local, n_local


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.expert_start, self.num_local, self.n_start, self.n_local = expert_split(num_experts, intermediate)
        self.w13 = nn.Parameter(torch.empty(self.num_local, 2 * self.n_local, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.num_local, hidden, self.n_local), requires_grad=False)
        for param in (self.w13, self.w2):
            param.weight_loader = self.weight_loader
        # global expert id -> local index, -1 for another rank's (None: every expert is here)
        ids = None
        if self.num_local < num_experts:
            ids = torch.full((num_experts,), -1, dtype=torch.int32)
            ids[self.expert_start : self.expert_start + self.num_local] = torch.arange(self.num_local, dtype=torch.int32)
        self.register_buffer("expert_map", ids, persistent=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """shard_id: (role, expert) for one expert's gate/up/down matrix, or (role, None) for a tensor
        stacked over all experts (transformers 5's gate_up / down, GGUF's *_exps); role is gate, up,
        gate_up or down."""
        role, expert = shard_id
        if expert is None:
            local = loaded.narrow(0, self.expert_start, self.num_local)
            if role == "gate_up":  # [E, 2N, H]: gate half, then up half
                n = loaded.shape[1] // 2
                self._load_rows(param.data, local.narrow(1, 0, n), "gate")
                self._load_rows(param.data, local.narrow(1, n, n), "up")
            else:
                self._load_rows(param.data, local, role)
            return
        if not self.expert_start <= expert < self.expert_start + self.num_local:
            return  # another rank's expert
        self._load_rows(param.data[expert - self.expert_start], loaded, role)

    def _load_rows(self, dst: torch.Tensor, src: torch.Tensor, role: str) -> None:
        # dst/src may carry a leading expert dim: the matrix dims are the last two
        n, start = self.n_local, self.n_start
        if role == "down":  # [.., H, N]: this rank's columns
            dst.copy_(src.narrow(-1, start, n))
        else:  # [.., N, H] into the gate (first) or up (second) half of w13's rows
            offset = 0 if role == "gate" else n
            dst.narrow(-2, offset, n).copy_(src.narrow(-2, start, n))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of the experts' output (the caller all-reduces)."""
        if fused_experts_triton is not None and takes_triton_moe(x):
            return fused_experts_triton(x, self.w13, self.w2, topk_weights, topk_ids, self.expert_map)
        return moe_experts_torch(x, self.w13, self.w2, topk_weights, topk_ids, self.expert_map)
