"""The batch-1 Triton GEMV kernels on the GPU, in bf16 and fp16, at Llama-3.1-8B's projection shapes
and odd ones: against an fp64 reference their error is no larger than cuBLAS's (both sum in fp32 and
round once to the half type), the fused gate/up + SiLU-and-mul equals the unfused path within one
rounding of the half type, and a CUDA graph replays them with new inputs. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096), (37, 300), (1000, 4097),
          (2, 13)]


def make(n_out: int, k_in: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    weight = (torch.randn(n_out, k_in, device="cuda", generator=gen) / k_in**0.5).to(dtype)
    x = torch.randn(1, k_in, device="cuda", generator=gen).to(dtype)
    return x, weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_out, k_in", SHAPES)
def test_gemv_error_no_larger_than_cublas(n_out, k_in, dtype):
    from radixserve.layers.gemv import gemv

    x, weight = make(n_out, k_in, dtype, n_out + k_in)
    exact = F.linear(x.double(), weight.double())
    ours = (gemv(x, weight).double() - exact).abs()
    theirs = (F.linear(x, weight).double() - exact).abs()
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(1e-3)
    assert (ours <= ulp + 1e-4).all(), float((ours - ulp).max())
    assert ours.mean() <= theirs.mean() * 1.25 + 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inter, k_in", [(14336, 4096), (4864, 896), (37, 300)])
def test_gemv_silu_mul_equals_the_unfused_path(inter, k_in, dtype):
    from radixserve.layers.fused import silu_and_mul
    from radixserve.layers.gemv import gemv_silu_mul

    x, weight = make(2 * inter, k_in, dtype, inter)
    want = silu_and_mul(F.linear(x, weight)).double()
    got = gemv_silu_mul(x, weight).double()
    # the projection's sums may round differently (fp32 sum order), by one half-precision ulp at most
    ulp = torch.finfo(dtype).eps * want.abs().clamp_min(1e-2)
    assert ((got - want).abs() <= 3 * ulp).all(), float(((got - want).abs() - 3 * ulp).max())


def test_gemv_in_a_cuda_graph_equals_eager():
    from radixserve.layers.gemv import gemv_silu_mul, linear, takes_gemv

    x, weight = make(4096, 4096, torch.bfloat16, 1)
    bias = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    gate_up = make(2 * 1024, 4096, torch.bfloat16, 2)[1]
    assert takes_gemv(x, weight)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        return linear(x, weight, bias), gemv_silu_mul(x, gate_up)

    before = step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    x.normal_()
    graph.replay()
    for out, want, old in zip(outs, step(), before):
        torch.testing.assert_close(out, want, atol=0, rtol=0)
        assert not torch.equal(out, old)
