"""Softmax top-k routing in one Triton kernel (router.select_experts on CUDA).

In torch the routing of a decode step is six small kernels (cast, softmax, topk, sum, divide, cast to
int32), each a launch a batch-1 step waits on in every MoE layer: more time than reading the router's
weights. Here one program per token loads its E logits, takes the softmax in fp32, picks the k best by
repeated max (ties go to the lower expert id) and writes the weights, renormalised where the model
says so, and the ids as int32: the same values as the torch path up to the order of the softmax's sum.
RADIXSERVE_TRITON_ROUTER=0 turns it off (A/B).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton keep the torch routing
    triton = None

ENABLED = os.environ.get("RADIXSERVE_TRITON_ROUTER", "1") != "0"
MAX_EXPERTS = 4096  # one program holds a token's whole row of logits

if triton is not None:

    @triton.jit
    def _topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, num_experts, stride, TOP_K: tl.constexpr,
                             BLOCK_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        experts = tl.arange(0, BLOCK_E)
        valid = experts < num_experts
        logits = tl.load(logits_ptr + token * stride + experts, mask=valid, other=float("-inf")).to(tl.float32)
        unnormed = tl.exp(logits - tl.max(logits, axis=0))
        probs = unnormed / tl.sum(unnormed, axis=0)
        left = tl.where(valid, probs, -1.0)  # probabilities are >= 0: -1 marks a taken or missing expert
        slots = tl.arange(0, BLOCK_K)
        chosen_w = tl.zeros([BLOCK_K], dtype=tl.float32)
        chosen_id = tl.zeros([BLOCK_K], dtype=tl.int32)
        for slot in tl.static_range(TOP_K):
            best = tl.max(left, axis=0)
            # (a NaN row matches nothing: clamp, so no id past the experts ever reaches the MoE kernels)
            best_id = tl.minimum(tl.min(tl.where(left == best, experts, BLOCK_E), axis=0), num_experts - 1)
            chosen_w = tl.where(slots == slot, best, chosen_w)
            chosen_id = tl.where(slots == slot, best_id, chosen_id)
            left = tl.where(experts == best_id, -1.0, left)
        if RENORMALIZE:
            chosen_w = chosen_w / tl.sum(chosen_w, axis=0)
        keep = slots < TOP_K
        tl.store(weights_ptr + token * TOP_K + slots, chosen_w, mask=keep)
        tl.store(ids_ptr + token * TOP_K + slots, chosen_id, mask=keep)


def _launch(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    tokens, num_experts = router_logits.shape
    assert 0 < top_k <= num_experts <= MAX_EXPERTS and router_logits.stride(1) == 1, (router_logits.shape, top_k)
    weights = torch.empty((tokens, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((tokens, top_k), dtype=torch.int32, device=router_logits.device)
    if tokens:
        _topk_softmax_kernel[(tokens,)](
            router_logits, weights, ids, num_experts, router_logits.stride(0), TOP_K=top_k,
            BLOCK_K=triton.next_power_of_2(top_k), RENORMALIZE=renormalize,
            BLOCK_E=triton.next_power_of_2(num_experts), num_warps=4 if num_experts > 256 else 1,
        )
    return weights, ids


def fused_topk_softmax(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """(weights [T, K] fp32, expert ids [T, K] int32) from the logits [T, E]: select_experts in one kernel."""
    if torch.compiler.is_compiling():
        return _topk_softmax_op(router_logits, top_k, renormalize)
    return _launch(router_logits, top_k, renormalize)


@torch.library.custom_op("radixserve::topk_softmax", mutates_args=())
def _topk_softmax_op(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    return _launch(router_logits, top_k, renormalize)


@_topk_softmax_op.register_fake
def _topk_softmax_fake(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    tokens = router_logits.shape[0]
    return (router_logits.new_empty((tokens, top_k), dtype=torch.float32),
            router_logits.new_empty((tokens, top_k), dtype=torch.int32))


def takes_fused_topk(router_logits: Tensor) -> bool:
    """True where the kernel runs: Triton present, the logits on CUDA, not turned off."""
    return (ENABLED and triton is not None and router_logits.is_cuda and router_logits.dim() == 2
            and router_logits.shape[-1] <= MAX_EXPERTS)
