"""The experts' computation in plain torch: the CPU path, and the reference the Triton kernels are
checked against. It loops over the experts that received tokens (a host-side decision, so it is not
for CUDA graphs: on CUDA the fused Triton kernel runs).

FP8 experts emulate what the FP8 kernel computes, as the dense CPU FP8 path does (fp8_linear.py): the
input rounded to e4m3 per token and group of bk columns, each projection F.linear against the
dequantized block-scaled weight in fp32 and rounded to x's dtype, SiLU-and-mul in x's dtype, the
product rounded to e4m3 per token group again before the down projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from radixserve.layers.quantization.fp8_utils import (
    block_fp8_linear_torch,
    dequantize_per_token_group,
    quantize_activation_per_token_group,
)


def fused_experts_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = topk_ids[t,k].

    x [T, H]; w13 [E, 2N, H] (gate rows, then up rows); w2 [E, H, N]; topk_* [T, K] with global expert
    ids; expert_map [E_global] -> local index or -1 for experts held by other ranks (they add nothing).
    Experts are visited in ascending order and added in x's dtype, as transformers does."""
    ids = topk_ids.long()
    if expert_map is not None:
        ids = expert_map.long()[ids]
    out = torch.zeros_like(x)
    n = w13.shape[1] // 2
    for expert in torch.unique(ids).tolist():
        if expert < 0:
            continue
        token_idx, slot = torch.where(ids == expert)
        gate_up = F.linear(x[token_idx], w13[expert])
        act = F.silu(gate_up[:, :n]) * gate_up[:, n:]
        y = F.linear(act, w2[expert]) * topk_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(x.dtype))
    return out


# One opaque op for torch.compile (fullgraph): the loop above decides on the host which experts run,
# which Dynamo cannot trace; as a custom op the compiled decode graph simply calls it.
@torch.library.custom_op("radixserve::moe_experts_torch", mutates_args=())
def moe_experts_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    return fused_experts_torch(x, w13, w2, topk_weights, topk_ids, expert_map)


@moe_experts_torch.register_fake
def _moe_experts_torch_fake(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                            topk_ids: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    return torch.empty_like(x)


def fused_experts_fp8_torch(x: torch.Tensor, w13: torch.Tensor, w13_scale_inv: torch.Tensor, w2: torch.Tensor,
                            w2_scale_inv: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                            expert_map: torch.Tensor | None = None,
                            block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """fused_experts_torch for e4m3 w13 [E, 2N, H] / w2 [E, H, N] with block factors w13_scale_inv
    [E, 2 ceil(N/bn), ceil(H/bk)] (gate half's block rows, then the up half's) and w2_scale_inv
    [E, ceil(H/bn), ceil(N/bk)], with the w8a8 numerics of the Triton kernel (module docstring)."""
    block = (int(block[0]), int(block[1]))
    ids = topk_ids.long()
    if expert_map is not None:
        ids = expert_map.long()[ids]
    out = torch.zeros_like(x)
    n = w13.shape[1] // 2
    half = w13_scale_inv.shape[1] // 2
    # every token's input rounds the same way whichever expert reads it: once, up front
    xq = dequantize_per_token_group(*quantize_activation_per_token_group(x, block[1]), group=block[1])
    for expert in torch.unique(ids).tolist():
        if expert < 0:
            continue
        token_idx, slot = torch.where(ids == expert)
        xe = xq[token_idx]
        w, s = w13[expert], w13_scale_inv[expert]
        gate = block_fp8_linear_torch(xe, w[:n], s[:half], block, out_dtype=x.dtype, quantize_activations=False)
        up = block_fp8_linear_torch(xe, w[n:], s[half:], block, out_dtype=x.dtype, quantize_activations=False)
        act = F.silu(gate) * up
        y = block_fp8_linear_torch(act, w2[expert], w2_scale_inv[expert], block, out_dtype=x.dtype)
        out.index_add_(0, token_idx, (y * topk_weights[token_idx, slot, None]).to(x.dtype))
    return out


@torch.library.custom_op("radixserve::moe_experts_fp8_torch", mutates_args=())
def moe_experts_fp8_torch(x: torch.Tensor, w13: torch.Tensor, w13_scale_inv: torch.Tensor, w2: torch.Tensor,
                          w2_scale_inv: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                          expert_map: torch.Tensor | None, block: list[int]) -> torch.Tensor:
    return fused_experts_fp8_torch(x, w13, w13_scale_inv, w2, w2_scale_inv, topk_weights, topk_ids, expert_map,
                                   (block[0], block[1]))


@moe_experts_fp8_torch.register_fake
def _moe_experts_fp8_torch_fake(x: torch.Tensor, w13: torch.Tensor, w13_scale_inv: torch.Tensor,
                                w2: torch.Tensor, w2_scale_inv: torch.Tensor, topk_weights: torch.Tensor,
                                topk_ids: torch.Tensor, expert_map: torch.Tensor | None,
                                block: list[int]) -> torch.Tensor:
    return torch.empty_like(x)
