"""Top-k routing: which experts each token goes to, and with what weight."""

from __future__ import annotations

import torch


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, K] fp32, expert ids [T, K] int32) from the router's logits [T, E].

    Softmax over all experts in fp32, the k largest, rescaled to sum to 1 when the model says so
    (Mixtral always; Qwen-MoE with norm_topk_prob), as transformers computes them."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)
