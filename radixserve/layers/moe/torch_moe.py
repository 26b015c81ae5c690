"""The experts' computation in plain torch: the CPU path, and the reference the Triton kernel is
checked against. It loops over the experts that received tokens (a host-side decision, so it is not
for CUDA graphs: on CUDA the fused Triton kernel runs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
