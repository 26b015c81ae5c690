"""The batch-1 Triton GEMV kernels equal the torch code they replace (on CPU they run in Triton's
interpreter, in fp32: only the summation order differs), and the model takes them exactly where
`takes_gemv` says: one half-precision row on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed")

from radixserve.layers import embedding, gemv  # noqa: E402
from radixserve.models import llama  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(atol=1e-3, rtol=1e-4)


def randn(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(DEVICE)


# K below, at and above the widest step (2048), and not multiples of it; N not a multiple of the rows
# a program owns
@pytest.mark.parametrize("n_out, k_in", [(37, 300), (5, 77), (64, 5000), (1, 1), (3, 4096), (130, 8200)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_linear(n_out, k_in, with_bias):
    gen = torch.Generator().manual_seed(n_out * 7 + k_in)
    weight = randn(n_out, k_in, gen=gen)
    bias = randn(n_out, gen=gen) if with_bias else None
    x = randn(1, k_in, gen=gen)
    got = gemv.gemv(x, weight, bias)
    assert got.shape == (1, n_out)
    torch.testing.assert_close(got, F.linear(x, weight, bias), **TOL)
    assert gemv.gemv(x.flatten(), weight, bias).shape == (n_out,)  # a 1-D row stays 1-D, as in F.linear


def test_gemv_reads_a_strided_row():
    gen = torch.Generator().manual_seed(3)
    weight = randn(48, 96, gen=gen)
    x = randn(1, 192, gen=gen)[:, ::2]  # one row with stride 2
    torch.testing.assert_close(gemv.gemv(x, weight), F.linear(x, weight), **TOL)


@pytest.mark.parametrize("inter, k_in", [(40, 64), (7, 300), (128, 4096), (3, 5000)])
def test_gemv_silu_mul_matches_projection_then_activation(inter, k_in):
    gen = torch.Generator().manual_seed(inter + k_in)
    weight = randn(2 * inter, k_in, gen=gen) / k_in**0.5  # gate rows, then up rows
    x = randn(1, k_in, gen=gen)
    gate, up = F.linear(x, weight).chunk(2, dim=-1)
    got = gemv.gemv_silu_mul(x, weight)
    assert got.shape == (1, inter)
    torch.testing.assert_close(got, F.silu(gate) * up, **TOL)


def test_takes_gemv_only_for_one_half_precision_row_on_cuda():
    w = torch.randn(8, 16)
    assert not gemv.takes_gemv(torch.randn(1, 16), w)  # CPU keeps F.linear
    x = torch.randn(3, 16)
    torch.testing.assert_close(gemv.linear(x, w), F.linear(x, w))
    if torch.cuda.is_available():
        wh = w.to("cuda", torch.bfloat16)
        assert gemv.takes_gemv(torch.randn(1, 16, device="cuda", dtype=torch.bfloat16), wh) == gemv.ENABLED
        assert not gemv.takes_gemv(torch.randn(2, 16, device="cuda", dtype=torch.bfloat16), wh)
        assert not gemv.takes_gemv(torch.randn(1, 16, device="cuda"), w.cuda())  # fp32 keeps cuBLAS
        assert not gemv.takes_gemv(torch.randn(1, 16, device="cuda", dtype=torch.bfloat16), wh.t().contiguous().t())


def any_one_row(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """takes_gemv widened to CPU fp32 rows, so the model's GEMV paths run in the interpreter."""
    return x.numel() == weight.shape[1] and weight.stride(1) == 1


def test_model_paths_through_the_gemv_equal_the_torch_paths(monkeypatch):
    """The MLP's fused gate/up + activation and the LM head, wired as the model calls them (weight
    layout, shapes), against the same modules on the torch path."""
    from tests.helpers import tiny_config

    cfg = tiny_config("llama")
    torch.manual_seed(0)
    mlp = llama.LlamaMLP(cfg.hidden_size, cfg.intermediate_size).to(DEVICE)
    head = embedding.ParallelLMHead(cfg.vocab_size, cfg.hidden_size).to(DEVICE)
    for p in (mlp.gate_up_proj.weight, mlp.down_proj.weight, head.weight):
        p.data.normal_(0, 0.1)
    x = torch.randn(1, cfg.hidden_size, device=DEVICE)
    want_mlp, want_logits = mlp(x), head.compute_logits(x)
    monkeypatch.setattr(llama, "takes_gemv", any_one_row)
    monkeypatch.setattr(gemv, "takes_gemv", any_one_row)  # what linear() asks, for every projection
    got_logits = head.compute_logits(x)
    assert got_logits.shape == (1, cfg.vocab_size)
    torch.testing.assert_close(mlp(x), want_mlp, **TOL)
    torch.testing.assert_close(got_logits, want_logits, **TOL)
    two = torch.randn(2, cfg.hidden_size, device=DEVICE)  # two rows keep the torch path
    monkeypatch.undo()
    want_two = mlp(two)
    monkeypatch.setattr(llama, "takes_gemv", any_one_row)
    torch.testing.assert_close(mlp(two), want_two, atol=0, rtol=0)
