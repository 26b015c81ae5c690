"""FusedMoE: a layer's experts as two stacked tensors, split over tensor- and expert-parallel ranks.

w13 [E_local, 2 N_local, H] holds each expert's gate rows then up rows; w2 [E_local, H, N_local] its
down projection. With --ep-size 1 every rank holds every expert and a 1/tp slice of each expert's
intermediate dim (N); with --ep-size P the experts are dealt out in P contiguous runs and each run's N
is split over the tp/P ranks that share it. Either way a rank's output is a partial sum over its
slices and experts, and one all-reduce over the TP group (the world, under DP attention) finishes it (the caller's, so that a shared
expert's partial sum rides in the same reduction).

FP8 experts (an FP8 checkpoint, or --quantization fp8): w13 and w2 in e4m3 with fp32 block factors
w13_weight_scale_inv [E_local, 2 ceil(N_local/bn), ceil(H/bk)] (the gate half's block rows, then the up
half's: each half keeps the checkpoint's own blocks, so N_local need not be a multiple of bn; with N_local
a multiple, this is ceil(2 N_local / bn)) and w2_weight_scale_inv [E_local, ceil(H/bn), ceil(N_local/bk)].
A checkpoint's per-expert `...experts.{e}.gate_proj.weight_scale_inv` (w1/w3/w2 in Mixtral) loads
through the same loader, sliced in block units; a TP split of N off the checkpoint's blocks is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from radixserve.distributed.parallel_state import get_moe_parallel, get_world
from radixserve.layers.moe.torch_moe import moe_experts_fp8_torch, moe_experts_torch
from radixserve.layers.quantization.fp8_linear import Fp8Config, get_fp8_config, to_scale_units
from radixserve.layers.quantization.fp8_utils import FP8_DTYPE, quantize_weight_block

try:
    from radixserve.layers.moe.triton_moe import fused_experts_triton, takes_triton_moe
except ImportError:  # the kernel module is optional on CPU-only installs
    fused_experts_triton = None

    def takes_triton_moe(x: torch.Tensor) -> bool:
        return False

try:
    from radixserve.layers.moe.triton_moe_fp8 import fused_experts_fp8_triton, takes_fp8_moe
except ImportError:
    fused_experts_fp8_triton = None

    def takes_fp8_moe(x: torch.Tensor) -> bool:
        return False


# checkpoint expert projection -> (our tensor, which rows of it)
EXPERT_PROJECTIONS = {
    "w1": ("w13", "gate"), "gate_proj": ("w13", "gate"),
    "w3": ("w13", "up"), "up_proj": ("w13", "up"),
    "w2": ("w2", "down"), "down_proj": ("w2", "down"),
}
# an FP8 checkpoint's `<projection>.weight_scale_inv` loads into `<our tensor>` + this
SCALE_SUFFIX = "_weight_scale_inv"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def expert_split(num_experts: int, intermediate: int) -> tuple[int, int, int, int]:
    """(first local expert, local experts, first intermediate column, local intermediate columns), over
    the MoE layers' ranks (the TP group; the whole world under DP attention)."""
    world = get_world()
    tp_size, tp_rank, ep_size = world.tp_size, world.tp_rank, get_moe_parallel().ep_size
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
        self.hidden, self.intermediate = hidden, intermediate
        self.expert_start, self.num_local, self.n_start, self.n_local = expert_split(num_experts, intermediate)
        config = get_fp8_config()
        self.fp8_block: tuple[int, int] | None = None
        self.fp8_pending: Fp8Config | None = None  # --quantization fp8: quantized after loading
        if config is not None and config.from_checkpoint:
            self._make_fp8_params(config)
        else:
            self.w13 = nn.Parameter(torch.empty(self.num_local, 2 * self.n_local, hidden), requires_grad=False)
            self.w2 = nn.Parameter(torch.empty(self.num_local, hidden, self.n_local), requires_grad=False)
            self.fp8_pending = config
        for param in self.parameters():
            param.weight_loader = self.weight_loader
        # global expert id -> local index, -1 for another rank's (None: every expert is here)
        ids = None
        if self.num_local < num_experts:
            ids = torch.full((num_experts,), -1, dtype=torch.int32)
            ids[self.expert_start : self.expert_start + self.num_local] = torch.arange(self.num_local, dtype=torch.int32)
        self.register_buffer("expert_map", ids, persistent=False)

    def _make_fp8_params(self, config: Fp8Config) -> None:
        """e4m3 w13/w2 and their block factors, as the checkpoint stores them; refuses a TP split of the
        intermediate dim that cuts the checkpoint's blocks (w13's rows in bn, w2's columns in bk)."""
        bn, bk = config.block
        e, n, h = self.num_local, self.n_local, self.hidden
        to_scale_units(self.n_start, n, _cdiv(self.intermediate, bn), bn, "FusedMoE gate/up")
        to_scale_units(self.n_start, n, _cdiv(self.intermediate, bk), bk, "FusedMoE down")
        self.fp8_block = config.block
        self.w13 = nn.Parameter(torch.empty(e, 2 * n, h, dtype=FP8_DTYPE), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, h, n, dtype=FP8_DTYPE), requires_grad=False)
        self.w13_weight_scale_inv = nn.Parameter(
            torch.ones(e, 2 * _cdiv(n, bn), _cdiv(h, bk), dtype=torch.float32), requires_grad=False)
        self.w2_weight_scale_inv = nn.Parameter(
            torch.ones(e, _cdiv(h, bn), _cdiv(n, bk), dtype=torch.float32), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """shard_id: (role, expert) for one expert's gate/up/down matrix, or (role, None) for a tensor
        stacked over all experts (transformers 5's gate_up / down, GGUF's *_exps); role is gate, up,
        gate_up or down."""
        role, expert = shard_id
        scale = param is getattr(self, "w13_weight_scale_inv", None) or param is getattr(self, "w2_weight_scale_inv", None)
        if expert is None:
            local = loaded.narrow(0, self.expert_start, self.num_local)
            if role == "gate_up":  # [E, 2N, H]: gate half, then up half
                n = loaded.shape[1] // 2
                self._load_rows(param.data, local.narrow(1, 0, n), "gate", scale)
                self._load_rows(param.data, local.narrow(1, n, n), "up", scale)
            else:
                self._load_rows(param.data, local, role, scale)
            return
        if not self.expert_start <= expert < self.expert_start + self.num_local:
            return  # another rank's expert
        self._load_rows(param.data[expert - self.expert_start], loaded, role, scale)

    def _load_rows(self, dst: torch.Tensor, src: torch.Tensor, role: str, scale: bool = False) -> None:
        # dst/src may carry a leading expert dim: the matrix dims are the last two; block factors
        # (scale) are sliced in block units
        n, start = self._scale_slice(src, role) if scale else (self.n_local, self.n_start)
        if role == "down":  # [.., H, N]: this rank's columns
            dst.copy_(src.narrow(-1, start, n))
        else:  # [.., N, H] into the gate (first) or up (second) half of w13's rows
            offset = 0 if role == "gate" else dst.shape[-2] // 2
            dst.narrow(-2, offset, n).copy_(src.narrow(-2, start, n))

    def _scale_slice(self, src: torch.Tensor, role: str) -> tuple[int, int]:
        """(count, start) of this rank's N slice in the checkpoint's block factors (bn rows of gate/up,
        bk columns of down), after checking the factors have the shape weight_block_size implies."""
        bn, bk = self.fp8_block
        nb, hb = (_cdiv(self.intermediate, bk), _cdiv(self.hidden, bn)) if role == "down" else (
            _cdiv(self.intermediate, bn), _cdiv(self.hidden, bk))
        want = (hb, nb) if role == "down" else (nb, hb)
        if tuple(src.shape[-2:]) != want:
            raise ValueError(f"FusedMoE {role} weight_scale_inv has shape {tuple(src.shape[-2:])}, expected {want} "
                             f"for weight_block_size {list(self.fp8_block)}")
        block = bk if role == "down" else bn
        start, count = to_scale_units(self.n_start, self.n_local, nb, block, f"FusedMoE {role}")
        return count, start

    @torch.no_grad()
    def quantize_pending_fp8(self) -> int:
        """--quantization fp8: each local expert's gate half, up half and down matrix to e4m3 with block
        factors, one expert at a time (the fp32 copy stays one expert's). Returns the bytes saved."""
        config = self.fp8_pending
        bn, bk = config.block
        w13, w2 = self.w13.data, self.w2.data
        e, n, h = self.num_local, self.n_local, self.hidden
        q13 = torch.empty(w13.shape, dtype=FP8_DTYPE, device=w13.device)
        q2 = torch.empty(w2.shape, dtype=FP8_DTYPE, device=w2.device)
        s13 = torch.empty(e, 2 * _cdiv(n, bn), _cdiv(h, bk), dtype=torch.float32, device=w13.device)
        s2 = torch.empty(e, _cdiv(h, bn), _cdiv(n, bk), dtype=torch.float32, device=w2.device)
        half = s13.shape[1] // 2
        for i in range(e):
            for rows, scale_rows in ((slice(0, n), slice(0, half)), (slice(n, 2 * n), slice(half, 2 * half))):
                q13[i, rows], s13[i, scale_rows] = quantize_weight_block(w13[i, rows].float(), config.block)
            q2[i], s2[i] = quantize_weight_block(w2[i].float(), config.block)
        before = w13.numel() * w13.element_size() + w2.numel() * w2.element_size()
        self.w13 = nn.Parameter(q13, requires_grad=False)
        self.w2 = nn.Parameter(q2, requires_grad=False)
        self.w13_weight_scale_inv = nn.Parameter(s13, requires_grad=False)
        self.w2_weight_scale_inv = nn.Parameter(s2, requires_grad=False)
        self.fp8_block, self.fp8_pending = config.block, None
        return before - q13.numel() - q2.numel() - 4 * (s13.numel() + s2.numel())

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of the experts' output (the caller all-reduces)."""
        if self.fp8_block is not None:
            args = (x, self.w13, self.w13_weight_scale_inv, self.w2, self.w2_weight_scale_inv, topk_weights,
                    topk_ids, self.expert_map)
            if fused_experts_fp8_triton is not None and takes_fp8_moe(x):
                return fused_experts_fp8_triton(*args, self.fp8_block)
            return moe_experts_fp8_torch(*args, list(self.fp8_block))
        if fused_experts_triton is not None and takes_triton_moe(x):
            return fused_experts_triton(x, self.w13, self.w2, topk_weights, topk_ids, self.expert_map)
        return moe_experts_torch(x, self.w13, self.w2, topk_weights, topk_ids, self.expert_map)
