"""The fused element-wise kernels index rows in int64: a row at offset >= 2^31 elements is read and
written where it is. (On an H100 a 131,072-token prefill crashed when SiLU-and-mul's row * stride
wrapped in int32.) Three rows 2^30 elements apart stand in for a long prefill; torch.empty leaves the
gaps untouched, so only a few pages are ever used. The kernels run in a child process, so a wrapped
offset fails this test instead of crashing the test run (in the interpreter it segfaults)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import os
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.nn.functional as F
    from radixserve.layers import fused

    device = "cuda" if torch.cuda.is_available() else "cpu"
    stride, rows, n = 1 << 30, 3, 16
    big = torch.empty(rows * stride, dtype=torch.bfloat16, device=device)

    def spaced(cols):
        view = big.as_strided((rows, cols), (stride, 1))
        view.copy_(torch.randn(rows, cols, generator=torch.Generator().manual_seed(cols)).to(view))
        return view

    x = spaced(2 * n)
    gate, up = x.float().chunk(2, dim=-1)
    ref = F.silu(gate).to(torch.bfloat16).float() * up
    torch.testing.assert_close(fused.silu_and_mul(x).float(), ref, rtol=2**-6, atol=2**-6)

    x = spaced(n)
    w = torch.ones(n, dtype=torch.bfloat16, device=device)
    ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(fused.rmsnorm(x, w, 1e-6).float(), ref, rtol=2**-6, atol=2**-6)

    x = spaced(n).view(rows, 1, n)
    before = x.float().clone()
    zero = torch.zeros(rows, dtype=torch.int64, device=device)
    cos = torch.ones(1, n, device=device)
    sin = torch.zeros(1, n, device=device)
    fused.rotary_inplace(x, zero, cos, sin)  # position 0: the identity, written back in place
    assert torch.equal(x.float(), before)
    print("ok")
""")


def test_fused_kernels_reach_rows_past_2_31_elements():
    pytest.importorskip("triton", reason="triton is not installed")
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.returncode, proc.stderr[-2000:])
