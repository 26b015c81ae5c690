"""The batch-1 Triton GEMV on the GPU, in bf16 and fp16: at Llama-3.1-8B's projection shapes and odd
ones, its error against an fp32 reference is no larger than cuBLAS's own (both round the fp32 sum
to the half type once, so each is within one half-precision ulp of the exact product), and it
gives the same result captured in a CUDA graph. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096), (37, 300), (1000, 4097),
          (2, 13)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_out, k_in", SHAPES)
def test_gemv_error_no_larger_than_cublas(n_out, k_in, dtype):
    from radixserve.layers.gemv import gemv

    gen = torch.Generator(device="cuda").manual_seed(n_out + k_in)
    weight = (torch.randn(n_out, k_in, device="cuda", generator=gen) / k_in**0.5).to(dtype)
    x = torch.randn(1, k_in, device="cuda", generator=gen).to(dtype)
    exact = F.linear(x.double(), weight.double())
    ours = (gemv(x, weight).double() - exact).abs()
    theirs = (F.linear(x, weight).double() - exact).abs()
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(1e-3)
    assert (ours <= ulp + 1e-4).all(), float((ours - ulp).max())
    assert ours.mean() <= theirs.mean() * 1.25 + 1e-6


def test_gemv_in_a_cuda_graph_equals_eager():
    from radixserve.layers.gemv import linear, takes_gemv

    weight = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    assert takes_gemv(x, weight)
    want = linear(x, weight, bias)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        linear(x, weight, bias)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear(x, weight, bias)
    x.normal_()
    graph.replay()
    torch.testing.assert_close(out, linear(x, weight, bias), atol=0, rtol=0)
    assert not torch.equal(out, want)
