"""The batch-1 Triton GEMV equals F.linear (on CPU it runs in Triton's interpreter, fp32), and
`linear` only takes it for one half-precision row on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed")

from radixserve.layers import gemv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n_out, k_in", [(37, 300), (5, 77), (64, 5000), (1, 1), (3, 4096), (130, 8200)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_linear(n_out, k_in, with_bias):
    gen = torch.Generator().manual_seed(n_out * 7 + k_in)
    weight = torch.randn(n_out, k_in, generator=gen).to(DEVICE)
    bias = torch.randn(n_out, generator=gen).to(DEVICE) if with_bias else None
    x = torch.randn(1, k_in, generator=gen).to(DEVICE)
    got = gemv.gemv(x, weight, bias)
    assert got.shape == (1, n_out)
    torch.testing.assert_close(got, F.linear(x, weight, bias), atol=1e-3, rtol=1e-4)
    flat = gemv.gemv(x.flatten(), weight, bias)  # a 1-D row keeps its shape, as F.linear does
    assert flat.shape == (n_out,)


def test_gemv_reads_a_strided_row():
    weight = torch.randn(48, 96).to(DEVICE)
    x = torch.randn(1, 192).to(DEVICE)[:, ::2]  # one row with stride 2
    torch.testing.assert_close(gemv.gemv(x, weight), F.linear(x, weight), atol=1e-3, rtol=1e-4)


def test_linear_takes_gemv_only_for_one_half_row_on_cuda():
    w = torch.randn(8, 16)
    assert not gemv.takes_gemv(torch.randn(1, 16), w)  # CPU
    if torch.cuda.is_available():
        wh = w.to("cuda", torch.bfloat16)
        assert gemv.takes_gemv(torch.randn(1, 16, device="cuda", dtype=torch.bfloat16), wh) == gemv.ENABLED
        assert not gemv.takes_gemv(torch.randn(2, 16, device="cuda", dtype=torch.bfloat16), wh)
        assert not gemv.takes_gemv(torch.randn(1, 16, device="cuda"), w.cuda())  # fp32 keeps cuBLAS
    x = torch.randn(3, 16)
    torch.testing.assert_close(gemv.linear(x, w), F.linear(x, w))
