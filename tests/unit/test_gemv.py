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


def any_row_device(x: torch.Tensor) -> bool:
    """`runs_gemv_on` widened to CPU fp32, so the model's GEMV paths run in the interpreter."""
    return True


def test_model_paths_through_the_gemv_equal_the_torch_paths(monkeypatch):
    """The MLP's fused gate/up + activation and the LM head, wired as the model calls them (weight
    layout, shapes), against the same modules on the torch path."""
    mlp, head, x = tiny_mlp_and_head()
    want_mlp, want_logits = mlp(x), head.compute_logits(x)
    monkeypatch.setattr(gemv, "runs_gemv_on", any_row_device)  # takes_gemv's device test, for every caller
    got_logits = head.compute_logits(x)
    assert got_logits.shape == (1, head.vocab_size)
    torch.testing.assert_close(mlp(x), want_mlp, **TOL)
    torch.testing.assert_close(got_logits, want_logits, **TOL)
    two = torch.randn(2, x.shape[1], device=DEVICE)  # two rows keep the torch path
    monkeypatch.undo()
    want_two = mlp(two)
    monkeypatch.setattr(gemv, "runs_gemv_on", any_row_device)
    torch.testing.assert_close(mlp(two), want_two, atol=0, rtol=0)


def tiny_mlp_and_head() -> tuple[llama.LlamaMLP, embedding.ParallelLMHead, torch.Tensor]:
    from tests.helpers import tiny_config

    cfg = tiny_config("llama")
    torch.manual_seed(0)
    mlp = llama.LlamaMLP(cfg.hidden_size, cfg.intermediate_size).to(DEVICE)
    head = embedding.ParallelLMHead(cfg.vocab_size, cfg.hidden_size).to(DEVICE)
    for p in (mlp.gate_up_proj.weight, mlp.down_proj.weight, head.weight):
        p.data.normal_(0, 0.1)
    return mlp, head, torch.randn(1, cfg.hidden_size, device=DEVICE)


def test_torch_compile_keeps_the_gemv_for_one_row_and_torch_for_a_dynamic_batch(monkeypatch):
    """Under torch.compile (as --enable-torch-compile traces the decode forward) the one-row graph
    holds the GEMV custom ops, computing what eager does, and a graph whose batch dimension is dynamic
    holds none of them: there the row count is unknown, so the torch path is traced."""
    mlp, head, x = tiny_mlp_and_head()
    monkeypatch.setattr(gemv, "runs_gemv_on", any_row_device)
    traced: list[set[str]] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        traced.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        # AOT tracing runs the ops' fake implementations, as Inductor would
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)

    def forward(h: torch.Tensor) -> torch.Tensor:
        return head.compute_logits(mlp(h))

    torch._dynamo.reset()
    compiled = torch.compile(forward, backend=recording_backend, fullgraph=True)
    with torch.no_grad():
        want = forward(x)
        torch.testing.assert_close(compiled(x), want, **TOL)
        assert {"radixserve.gemv.default", "radixserve.gemv_silu_mul.default"} <= traced[-1], traced
        rows = torch.randn(3, x.shape[1], device=DEVICE)
        torch._dynamo.mark_dynamic(rows, 0)
        torch.testing.assert_close(compiled(rows), forward(rows), **TOL)
    assert not any("radixserve" in t for t in traced[-1]), traced
    torch._dynamo.reset()
