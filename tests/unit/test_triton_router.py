"""The one-kernel softmax top-k router against router.select_experts' torch path, in Triton's
interpreter on the CPU (on a GPU, the real kernel)."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers.moe import router

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_router():
    pytest.importorskip("triton", reason="triton is not installed")  # conftest runs it interpreted on a CPU
    from radixserve.layers.moe import triton_router

    return triton_router


def torch_routing(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


@pytest.mark.parametrize("tokens, experts, top_k", [(1, 8, 2), (5, 60, 4), (3, 128, 8), (2, 7, 3), (4, 6, 6)])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_topk_matches_torch(triton_router, tokens, experts, top_k, renormalize, dtype):
    gen = torch.Generator().manual_seed(tokens * 1000 + experts)
    # distinct logits in each row, exact in bf16 (multiples of 1/8 below 16): the torch path and the
    # kernel then agree on the order exactly
    logits = torch.stack([torch.randperm(experts, generator=gen) for _ in range(tokens)]).float() / 8.0
    logits = logits.to(dtype)
    logits = logits.to(DEVICE)
    weights, ids = triton_router.fused_topk_softmax(logits, top_k, renormalize)
    ref_w, ref_ids = torch_routing(logits, top_k, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (tokens, top_k)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)


def test_ties_and_strided_logits(triton_router):
    # equal logits: every expert as likely; the kernel takes the lowest ids, each exactly once
    logits = torch.zeros(2, 16, device=DEVICE)
    weights, ids = triton_router.fused_topk_softmax(logits, 4, True)
    assert ids.tolist() == [[0, 1, 2, 3]] * 2
    torch.testing.assert_close(weights, torch.full((2, 4), 0.25, device=DEVICE))
    # a column slice of a wider tensor (rows strided) reads the right rows
    wide = torch.randn(3, 40, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    w, i = triton_router.fused_topk_softmax(wide[:, :20], 2, False)
    ref_w, ref_i = torch_routing(wide[:, :20], 2, False)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(w, ref_w)
    empty_w, empty_i = triton_router.fused_topk_softmax(wide[:0, :20], 2, False)
    assert empty_w.shape == empty_i.shape == (0, 2)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's numpy max of NaNs
def test_nan_row_never_names_an_expert_past_the_end(triton_router):
    logits = torch.full((1, 8), float("nan"), device=DEVICE)
    _, ids = triton_router.fused_topk_softmax(logits, 2, True)
    assert ids.min() >= 0 and ids.max() < 8


def test_select_experts_uses_the_kernel_on_cuda_only(triton_router):
    logits = torch.randn(2, 8)
    assert not triton_router.takes_fused_topk(logits)  # CPU tensors: torch routing
    w, i = router.select_experts(logits, 2, True)
    ref_w, ref_i = torch_routing(logits, 2, True)
    assert torch.equal(i, ref_i) and torch.equal(w, ref_w)


@pytest.mark.parametrize("scaling", [1.0, 2.5])
@pytest.mark.parametrize("renormalize", [True, False])
def test_deepseek_greedy_routing_through_the_kernel(triton_router, monkeypatch, scaling, renormalize):
    """select_experts_grouped's greedy softmax (DeepSeek-V2-Lite) takes the kernel where it runs: same ids,
    same weights as the torch path."""
    gen = torch.Generator().manual_seed(5)
    logits = (torch.stack([torch.randperm(64, generator=gen) for _ in range(3)]).float() / 8.0).to(DEVICE)
    kwargs = dict(scoring="softmax", topk_method="greedy", n_group=1, topk_group=1, renormalize=renormalize,
                  routed_scaling_factor=scaling)
    monkeypatch.setattr(router, "takes_fused_topk", lambda _: False)
    ref_w, ref_i = router.select_experts_grouped(logits, 6, **kwargs)
    monkeypatch.setattr(router, "takes_fused_topk", lambda _: True)
    w, i = router.select_experts_grouped(logits, 6, **kwargs)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-7)


def test_kernel_is_one_opaque_op_under_torch_compile(triton_router):
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    compiled = torch.compile(lambda x: triton_router.fused_topk_softmax(x, 2, True), backend="aot_eager",
                             fullgraph=True)
    w, i = compiled(logits)
    ref_w, ref_i = torch_routing(logits, 2, True)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(w, ref_w)
