"""The fused Triton kernels (RMSNorm + residual, SiLU-and-mul, rotary) equal the torch reference
layers. On CPU they run in Triton's interpreter (fp32, tolerance 1e-5)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from radixserve.layers import fused  # noqa: E402
from radixserve.layers.activation import SiluAndMul  # noqa: E402
from radixserve.layers.norm import RMSNorm  # noqa: E402
from radixserve.layers.rotary import RotaryEmbedding, apply_rotary  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hidden", [64, 96, 576])
def test_rmsnorm_with_and_without_residual(hidden):
    torch.manual_seed(0)
    norm = RMSNorm(hidden, eps=1e-5).to(DEVICE)
    norm.weight.data = torch.randn(hidden, device=DEVICE)
    x = torch.randn(7, hidden, device=DEVICE)
    res = torch.randn(7, hidden, device=DEVICE)
    torch.testing.assert_close(fused.rmsnorm(x, norm.weight, 1e-5), norm._norm(x), **TOL)
    out, new_res = fused.rmsnorm(x, norm.weight, 1e-5, res)
    torch.testing.assert_close(new_res, x + res, **TOL)
    torch.testing.assert_close(out, norm._norm(x + res), **TOL)


@pytest.mark.parametrize("n", [16, 100, 1536])
def test_silu_and_mul(n):
    torch.manual_seed(1)
    x = torch.randn(5, 2 * n, device=DEVICE)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_and_mul(x), torch.nn.functional.silu(gate) * up, **TOL)
    assert SiluAndMul()(x).shape == (5, n)


@pytest.mark.parametrize("heads, dim", [(3, 64), (12, 32), (5, 80)])
def test_rotary_inplace_matches_reference(heads, dim):
    torch.manual_seed(2)
    rope = RotaryEmbedding(dim, 256, 10000.0, None).to(DEVICE)
    qkv = torch.randn(9, heads + 2, dim, device=DEVICE)
    qk = qkv[:, :heads]  # a strided view, as in the attention layer
    positions = torch.tensor([0, 1, 2, 5, 8, 13, 100, 200, 255], device=DEVICE)
    cos, sin = rope.cos_sin(positions, qk.dtype)
    want = apply_rotary(qk.clone(), cos, sin)
    untouched = qkv[:, heads:].clone()
    fused.rotary_inplace(qk, positions, rope.cos_cache, rope.sin_cache)
    torch.testing.assert_close(qk, want, **TOL)
    assert torch.equal(qkv[:, heads:], untouched)


@pytest.mark.parametrize("heads, dim, tokens", [(2, 64, 37), (3, 80, 5), (8, 128, 1)])
def test_store_kv_writes_rows_at_slots(heads, dim, tokens):
    """The one-launch K/V store equals the indexed write, for k/v that are strided views of a fused
    qkv output, rows wider than one block (3 x 80 = 240 is no power of two), and untouched slots
    left as they were."""
    torch.manual_seed(4)
    qkv = torch.randn(tokens, (4 + 2) * heads * dim, device=DEVICE)
    _, k, v = qkv.split([4 * heads * dim, heads * dim, heads * dim], dim=1)
    k, v = k.view(tokens, heads, dim), v.view(tokens, heads, dim)
    assert fused.rows_are_contiguous(k) and (tokens == 1 or not k.is_contiguous())
    slots = torch.randperm(tokens + 9, device=DEVICE)[:tokens] + 1
    k_buf = torch.randn(tokens + 10, heads, dim, device=DEVICE)
    v_buf = torch.randn(tokens + 10, heads, dim, device=DEVICE)
    want_k, want_v = k_buf.clone(), v_buf.clone()
    want_k[slots], want_v[slots] = k, v
    fused.store_kv(k, v, k_buf, v_buf, slots)
    assert torch.equal(k_buf, want_k) and torch.equal(v_buf, want_v)


def test_rows_are_contiguous_rejects_head_major_views():
    x = torch.randn(4, 3, 8)
    assert fused.rows_are_contiguous(x)
    assert not fused.rows_are_contiguous(x.transpose(0, 1).contiguous().transpose(0, 1))
