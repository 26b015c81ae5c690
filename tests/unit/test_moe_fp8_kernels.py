"""FP8 experts: the Triton kernel (layers/moe/triton_moe_fp8.py, in Triton's interpreter on the CPU)
against the torch path (torch_moe.fused_experts_fp8_torch), and the torch path against a per-token
loop over the dequantized weights written here; FusedMoE's FP8 parameters, loading and quantization.

Tolerances: in fp32 the kernel and the torch path see the same e4m3 inputs and differ only in
summation order, so they agree to 1e-5 relative; in bf16 an output rounding may flip, and through it
the activation's e4m3 rounding (a 2^-4 step of one element), so they agree to a few bf16 ulps.
Against plain bf16-free math (the per-token loop over dequantized weights, no activation rounding)
the w8a8 rounding adds up to 2^-4 per activation element: a relative error of a few percent."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radixserve.layers.moe.torch_moe import fused_experts_fp8_torch
from radixserve.layers.quantization.fp8_utils import (
    FP8_DTYPE,
    dequantize_block,
    dequantize_per_token_group,
    quantize_activation_per_token_group,
    quantize_weight_block,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
# small tiles so the interpreter walks several row and column blocks
SMALL_TILE = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2)


def quantize_experts(w13: torch.Tensor, w2: torch.Tensor, block: tuple[int, int]):
    """layer.py's layout: each expert's gate half, up half and down matrix quantized on their own."""
    n = w13.shape[1] // 2
    q13, s13, q2, s2 = [], [], [], []
    for e in range(w13.shape[0]):
        (gq, gs), (uq, us) = quantize_weight_block(w13[e, :n], block), quantize_weight_block(w13[e, n:], block)
        q13.append(torch.cat([gq, uq]))
        s13.append(torch.cat([gs, us]))
        dq, ds = quantize_weight_block(w2[e], block)
        q2.append(dq)
        s2.append(ds)
    return [torch.stack(t).to(DEVICE) for t in (q13, s13, q2, s2)]


def make(t: int, e: int, h: int, n: int, k: int, block: tuple[int, int], seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen)
    w13 = torch.randn(e, 2 * n, h, generator=gen) / h**0.5
    w2 = torch.randn(e, h, n, generator=gen) / n**0.5
    weights, ids = torch.randn(t, e, generator=gen).softmax(-1).topk(k, dim=-1)
    return x.to(DEVICE, dtype), *quantize_experts(w13, w2, block), weights.to(DEVICE), ids.to(DEVICE)


def per_token_reference(x, q13, s13, q2, s2, weights, ids, block, expert_map=None):
    """One (token, slot) at a time over the dequantized weights, with the w8a8 rounding of the
    activations spelled out (fp32 only: no dtype rounding)."""
    n = q13.shape[1] // 2
    half = s13.shape[1] // 2

    def rnd(v):
        return dequantize_per_token_group(*quantize_activation_per_token_group(v[None], block[1]), block[1])[0]

    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) if expert_map is None else int(expert_map[int(ids[t, j])])
            if e < 0:
                continue
            gate_w = dequantize_block(q13[e, :n], s13[e, :half], block)
            up_w = dequantize_block(q13[e, n:], s13[e, half:], block)
            xq = rnd(x[t].float())
            act = F.silu(F.linear(xq, gate_w)) * F.linear(xq, up_w)
            out[t] += F.linear(rnd(act), dequantize_block(q2[e], s2[e], block)) * weights[t, j]
    return out


@pytest.mark.parametrize("t, e, k, h, n, block", [
    (1, 4, 1, 48, 40, (16, 16)),  # one token; H, N not multiples of the block
    (5, 6, 2, 64, 32, (16, 16)),  # E not a power of two; multiples
    (9, 3, 2, 40, 24, (16, 32)),  # bn != bk; K shorter than one group at the tail
    (17, 8, 1, 32, 48, (32, 16)),
])
def test_torch_path_matches_per_token_reference(t, e, k, h, n, block):
    args = make(t, e, h, n, k, block, seed=t + e + k)
    got = fused_experts_fp8_torch(*args, block=block)
    torch.testing.assert_close(got, per_token_reference(*args, block), **FP32_TOL)


def test_torch_path_is_close_to_the_unquantized_experts():
    """The w8a8 emulation stays near the exact math on the original weights: four e4m3 roundings
    (input, w13, activation, w2), each about 2.5% rms relative, add up to about 5% (measured 6.6%)."""
    from radixserve.layers.moe.torch_moe import fused_experts_torch

    gen = torch.Generator().manual_seed(3)
    t, e, h, n, block = 24, 4, 64, 48, (16, 16)
    x = torch.randn(t, h, generator=gen)
    w13, w2 = torch.randn(e, 2 * n, h, generator=gen) / 8, torch.randn(e, h, n, generator=gen) / 7
    weights, ids = torch.randn(t, e, generator=gen).softmax(-1).topk(2, dim=-1)
    got = fused_experts_fp8_torch(x, *quantize_experts(w13, w2, block), weights, ids, block=block)
    want = fused_experts_torch(x, w13, w2, weights, ids)
    assert ((got - want).norm() / want.norm()).item() < 0.1


@pytest.fixture
def fp8_moe():
    pytest.importorskip("triton", reason="triton is not installed")
    from radixserve.layers.moe import triton_moe_fp8

    return triton_moe_fp8


@pytest.mark.parametrize("t, e, k, h, n, block", [
    (1, 4, 1, 48, 40, (16, 16)),
    (1, 5, 2, 64, 32, (16, 16)),  # one token, E not a power of two
    (7, 6, 2, 48, 40, (16, 16)),
    (33, 3, 2, 64, 48, (32, 16)),  # bn != bk: w13's factor rows cover 32 gate rows each
    (20, 8, 1, 40, 24, (16, 32)),  # H and N below / off the 32-wide K groups
])
@pytest.mark.parametrize("tile", [None, SMALL_TILE])
def test_kernel_matches_torch_path_fp32(fp8_moe, t, e, k, h, n, block, tile):
    args = make(t, e, h, n, k, block, seed=7 * t + e)
    got = fp8_moe.fused_moe_fp8_launch(*args, block=block, config=tile)
    assert got.shape == args[0].shape and got.dtype == torch.float32
    torch.testing.assert_close(got, fused_experts_fp8_torch(*args, block=block), **FP32_TOL)


def test_kernel_rounds_like_the_torch_path_in_bf16(fp8_moe):
    """In bf16 each projection and the activation round to bf16 before the activation's e4m3 rounding,
    so a flipped bf16 rounding can move an e4m3 value a whole 2^-4 step. Measured against the same
    math in fp32: the torch path 1.0% (relative norm), the kernel 2.1% in the interpreter, whose bf16
    casts truncate instead of rounding to nearest (the GPU rounds)."""
    block = (16, 16)
    args = make(40, 4, 64, 48, 2, block, seed=5, dtype=torch.bfloat16)
    got = fp8_moe.fused_experts_fp8_triton(*args, block=block)
    assert got.dtype == torch.bfloat16
    want = fused_experts_fp8_torch(*args, block=block).float()
    exact = fused_experts_fp8_torch(args[0].float(), *args[1:], block=block)
    assert ((got.float() - exact).norm() / exact.norm()).item() < 0.03
    assert ((want - exact).norm() / exact.norm()).item() < 0.015
    assert (got.float() - want).abs().amax() < 2**-4 * want.abs().amax()


@pytest.mark.parametrize("tile", [None, SMALL_TILE])
def test_remote_experts_add_exactly_nothing(fp8_moe, tile):
    block, e_global, t, k, h, n = (16, 16), 7, 21, 2, 48, 40
    x, q13, s13, q2, s2, weights, ids = make(t, e_global, h, n, k, block, seed=11)
    expert_map = torch.tensor([0, -1, 1, -1, -1, 2, -1], dtype=torch.int32, device=DEVICE)
    local = expert_map >= 0
    local_w = [w[local].contiguous() for w in (q13, s13, q2, s2)]
    got = fp8_moe.fused_moe_fp8_launch(x, *local_w, weights, ids.int(), expert_map, block, config=tile)
    torch.testing.assert_close(got, fused_experts_fp8_torch(x, *local_w, weights, ids, expert_map, block), **FP32_TOL)
    torch.testing.assert_close(got, per_token_reference(x, *local_w, weights, ids, block, expert_map), **FP32_TOL)
    ids[:3] = torch.tensor([1, 3], device=DEVICE)  # only remote experts: exactly zero
    got = fp8_moe.fused_moe_fp8_launch(x, *local_w, weights, ids, expert_map, block, config=tile)
    assert torch.equal(got[:3], torch.zeros_like(got[:3])) and torch.isfinite(got).all()


def test_custom_op_and_fake(fp8_moe):
    block = (16, 16)
    args = make(5, 4, 48, 40, 2, block, seed=1)
    # (opcheck's schema test multiplies the inputs, which fp8 tensors do not support on the CPU)
    torch.library.opcheck(fp8_moe._fused_moe_fp8_op, (*args, None, list(block)), test_utils=("test_faketensor",))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = fp8_moe._fused_moe_fp8_op(*(mode.from_tensor(a) for a in args), None, list(block))
    assert fake.shape == args[0].shape and fake.dtype == args[0].dtype
    compiled = torch.compile(fp8_moe.fused_experts_fp8_triton, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args, None, block), fp8_moe.fused_experts_fp8_triton(*args, None, block))


def test_takes_fp8_moe_only_on_fp8_gpus(fp8_moe):
    assert not fp8_moe.takes_fp8_moe(torch.randn(2, 8))  # CPU: the torch path


# ---- the layer -------------------------------------------------------------------------------------


def fp8_layer(e: int, h: int, n: int, block: tuple[int, int], from_checkpoint: bool):
    from radixserve.layers.moe.layer import FusedMoE
    from radixserve.layers.quantization.fp8_linear import Fp8Config, set_fp8_config

    set_fp8_config(Fp8Config(block=block, from_checkpoint=from_checkpoint))
    try:
        return FusedMoE(e, h, n)
    finally:
        set_fp8_config(None)


def test_layer_loads_checkpoint_experts_and_their_factors():
    block, e, h, n = (16, 16), 3, 48, 40
    layer = fp8_layer(e, h, n, block, from_checkpoint=True)
    assert layer.w13.dtype == layer.w2.dtype == FP8_DTYPE
    assert layer.w13_weight_scale_inv.shape == (e, 2 * 3, 3) and layer.w2_weight_scale_inv.shape == (e, 3, 3)
    gen = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(e, 2 * n, h, generator=gen), torch.randn(e, h, n, generator=gen)
    q13, s13, q2, s2 = (t.cpu() for t in quantize_experts(w13, w2, block))
    for i in range(e):  # as published: one tensor per expert and projection, factors beside it
        for role, rows, scale_rows in (("gate", slice(0, n), slice(0, 3)), ("up", slice(n, 2 * n), slice(3, 6))):
            layer.weight_loader(layer.w13, q13[i, rows], (role, i))
            layer.weight_loader(layer.w13_weight_scale_inv, s13[i, scale_rows], (role, i))
        layer.weight_loader(layer.w2, q2[i], ("down", i))
        layer.weight_loader(layer.w2_weight_scale_inv, s2[i], ("down", i))
    assert torch.equal(layer.w13.view(torch.uint8), q13.view(torch.uint8)) and torch.equal(layer.w13_weight_scale_inv, s13)
    assert torch.equal(layer.w2.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(layer.w2_weight_scale_inv, s2)
    with pytest.raises(ValueError, match="weight_scale_inv has shape"):  # factors of another block size
        layer.weight_loader(layer.w2_weight_scale_inv, torch.ones(6, 5), ("down", 0))


def test_quantization_at_load_matches_per_expert_blocks():
    block, e, h, n = (16, 16), 3, 48, 40
    layer = fp8_layer(e, h, n, block, from_checkpoint=False)
    assert layer.w13.dtype == torch.float32 and layer.fp8_block is None
    gen = torch.Generator().manual_seed(1)
    w13, w2 = torch.randn(e, 2 * n, h, generator=gen), torch.randn(e, h, n, generator=gen)
    layer.w13.data.copy_(w13)
    layer.w2.data.copy_(w2)
    from radixserve.layers.quantization.fp8_linear import quantize_loaded_weights

    saved = quantize_loaded_weights(layer)
    assert saved > 0 and layer.fp8_block == block and layer.fp8_pending is None
    for got, want in zip((layer.w13, layer.w13_weight_scale_inv, layer.w2, layer.w2_weight_scale_inv),
                         quantize_experts(w13, w2, block)):
        assert torch.equal(got.cpu().float(), want.cpu().float())


def test_tp_split_off_the_blocks_is_refused(monkeypatch):
    from radixserve.layers.moe import layer as moe_layer

    # rank 1 of 2 would own intermediate rows 24..47: not on 16-row blocks
    monkeypatch.setattr(moe_layer, "expert_split", lambda e, n: (0, e, 24, 24))
    with pytest.raises(ValueError, match="scale blocks"):
        fp8_layer(4, 32, 48, (16, 16), from_checkpoint=True)
    monkeypatch.setattr(moe_layer, "expert_split", lambda e, n: (0, e, 32, 32))
    fp8_layer(4, 32, 64, (16, 16), from_checkpoint=True)  # on the blocks: fine
