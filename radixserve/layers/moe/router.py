"""Top-k routing: which experts each token goes to, and with what weight."""

from __future__ import annotations

import torch

from radixserve.layers.moe.triton_router import fused_topk_softmax, takes_fused_topk


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, K] fp32, expert ids [T, K] int32) from the router's logits [T, E].

    Softmax over all experts in fp32, the k largest, rescaled to sum to 1 when the model says so
    (Mixtral always; Qwen-MoE with norm_topk_prob), as transformers computes them. On CUDA one Triton
    kernel computes the same (triton_router.py)."""
    if takes_fused_topk(router_logits):
        return fused_topk_softmax(router_logits, top_k, renormalize)
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def select_experts_grouped(
    router_logits: torch.Tensor, top_k: int, *, scoring: str, topk_method: str, n_group: int, topk_group: int,
    renormalize: bool, routed_scaling_factor: float, correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's routing: (weights [T, K] fp32, expert ids [T, K] int32) from the logits [T, E].

    Scores are softmax (V2) or sigmoid (V3) of the fp32 logits. greedy takes the k best experts;
    group_limited_greedy (V2) keeps the topk_group groups with the best single expert and takes the k
    best in them; noaux_tc (V3) adds the correction bias for choosing only, ranks groups by the sum of
    their two best biased scores, and weights the chosen experts by their unbiased scores. Weights are
    rescaled to sum to 1 when renormalize, then multiplied by routed_scaling_factor."""
    if topk_method == "greedy" and scoring == "softmax" and takes_fused_topk(router_logits):
        weights, ids = fused_topk_softmax(router_logits, top_k, renormalize)  # V2-Lite's routing, one kernel
        return (weights * routed_scaling_factor if routed_scaling_factor != 1.0 else weights), ids
    scores = router_logits.float()
    scores = torch.softmax(scores, dim=-1) if scoring == "softmax" else scores.sigmoid()
    if topk_method == "greedy":
        weights, ids = torch.topk(scores, top_k, dim=-1)
    else:
        tokens, num_experts = scores.shape
        choice = scores
        if topk_method == "noaux_tc":
            if correction_bias is None:
                raise ValueError("topk_method noaux_tc needs the gate's e_score_correction_bias")
            choice = scores + correction_bias.float()
        grouped = choice.view(tokens, n_group, num_experts // n_group)
        if topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        best_groups = torch.topk(group_scores, topk_group, dim=-1)[1]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        keep = keep.unsqueeze(-1).expand_as(grouped).reshape(tokens, num_experts)
        # V2 zeroes the other groups' (non-negative) softmax scores; V3 sets them to -inf
        masked = choice.masked_fill(~keep, float("-inf") if topk_method == "noaux_tc" else 0.0)
        ids = torch.topk(masked, top_k, dim=-1)[1]
        weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids.to(torch.int32)
