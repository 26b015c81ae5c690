"""FP8 building blocks: the torch formats' numerics (any install) and the Triton kernels against them
(on CPU the kernels run in Triton's interpreter).

Tolerances follow from e4m3's 3 mantissa bits: rounding to nearest moves a normal value by at most
2^-4 of itself, and a subnormal one (below 2^-6 of the scale) by at most half the step 2^-9 of the
scale, so |dequant(quant(v)) - v| <= 2^-4 |v| + 2^-10 scale, element by element."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radixserve.layers.quantization import fp8_utils
from radixserve.layers.quantization.fp8_utils import FP8_DTYPE, FP8_MAX

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL = 2.0**-4  # e4m3 rounding, relative
SUB = 2.0**-10  # e4m3 subnormal rounding, in units of the scale
# an output's rounding to bf16: half an ulp on the GPU, a whole one in the interpreter (which truncates)
BF16_RTOL = 2.0**-7
SHAPES = [(200, 320), (256, 256), (130, 77)]  # N, K: not multiples of 128, multiples, a K below one group


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE)


def bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def fp32_gemm_tolerance(ref: torch.Tensor) -> dict[str, float]:
    """How close an fp8 GEMM's fp32 output must be to the fp32 reference. The interpreter's tl.dot is
    exact fp32. Hopper's fp8 MMA is not: it accumulates with about 14 mantissa bits before each
    128-column block is added in fp32 (DeepSeek-V3's report), which an H100 showed as 6.9e-4 on
    outputs up to ~3 (2026-12-07), so on a GPU the bound is 2^-10 of the largest output."""
    if DEVICE == "cpu":
        return dict(rtol=1e-5, atol=1e-5)
    return dict(rtol=2.0**-10, atol=2.0**-10 * ref.abs().max().item())


@pytest.fixture
def kernels():
    pytest.importorskip("triton", reason="triton is not installed")
    from radixserve.layers.quantization import fp8_kernels

    return fp8_kernels


# ---- torch formats -------------------------------------------------------------------------------


@pytest.mark.parametrize("n, k", SHAPES)
def test_block_quant_round_trip_within_e4m3(n, k):
    w = randn(n, k, seed=n + k, scale=0.02)
    w[:128, 128:256] *= 1000.0  # a loud block must not cost the others precision
    q, scale_inv = fp8_utils.quantize_weight_block(w)
    assert q.dtype == FP8_DTYPE and q.shape == (n, k)
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (-(-n // 128), -(-k // 128))
    deq = fp8_utils.dequantize_block(q, scale_inv, (128, 128))
    scale = fp8_utils.expand_block_scales(scale_inv, (n, k), (128, 128))
    err = (deq - w).abs()
    assert torch.all(err <= REL * w.abs() + SUB * scale)
    rel = err / w.abs().clamp(min=1e-30)
    assert rel[w.abs() >= 2.0**-6 * scale].mean() < 0.03  # normal range: about 2.2% on average
    # each block's largest magnitude maps to 448 exactly
    assert q.float().abs().amax() == FP8_MAX
    assert fp8_utils.dequantize_block(q, scale_inv, (128, 128), torch.bfloat16).dtype == torch.bfloat16


def test_quantisers_stay_finite_on_zeros_and_large_values():
    w = torch.zeros(200, 320, device=DEVICE)
    w[0, 0] = 3e38  # near fp32's max
    w[150:, 200:] = -1e30
    q, scale_inv = fp8_utils.quantize_weight_block(w)
    deq = fp8_utils.dequantize_block(q, scale_inv)
    assert torch.isfinite(deq).all() and torch.isfinite(scale_inv).all()
    assert torch.equal(deq[1:128, 128:], torch.zeros_like(deq[1:128, 128:]))  # zero blocks stay zero
    torch.testing.assert_close(deq[150:, 200:], w[150:, 200:], rtol=0, atol=0)  # -1e30 / scale = -448
    x = torch.zeros(3, 320, device=DEVICE)
    x[1] = 1e30
    xq, xs = fp8_utils.quantize_activation_per_token_group(x)
    assert not xq.float().isnan().any() and torch.isfinite(xs).all()
    assert torch.equal(xq[0].float(), torch.zeros(320, device=DEVICE))
    qc, sc = fp8_utils.quantize_weight_per_channel(w)
    assert not qc.float().isnan().any() and sc.shape == (200, 1)


def test_per_channel_round_trip():
    w = randn(96, 200, seed=5) * torch.logspace(-3, 2, 96, device=DEVICE)[:, None]  # rows of every scale
    q, scale = fp8_utils.quantize_weight_per_channel(w)
    assert q.shape == w.shape and scale.shape == (96, 1)
    assert torch.all((q.float() * scale - w).abs() <= REL * w.abs() + SUB * scale)


@pytest.mark.parametrize("k", [320, 256, 77])
def test_token_group_quant_round_trip(k):
    x = randn(5, k, seed=k, scale=4.0).to(torch.bfloat16)
    x[2, :128] = 0  # a zero group (all of row 2 when k < 128)
    q, scales = fp8_utils.quantize_activation_per_token_group(x)
    assert q.shape == (5, k) and scales.shape == (5, -(-k // 128))
    deq = fp8_utils.dequantize_per_token_group(q, scales)
    s = scales.repeat_interleave(128, dim=1)[:, :k]
    assert torch.all((deq - x.float()).abs() <= REL * x.float().abs() + SUB * s)
    assert torch.equal(deq[2, :128], torch.zeros_like(deq[2, :128]))
    # leading dimensions are kept
    q3, s3 = fp8_utils.quantize_activation_per_token_group(x.view(1, 5, k))
    assert q3.shape == (1, 5, k) and s3.shape == (1, 5, scales.shape[1]) and torch.equal(bits(q3[0]), bits(q))


def test_per_tensor_quantize_clamps_instead_of_nan():
    x = torch.tensor([1000.0, -1000.0, 3.0, 0.1, 1e30, 0.0], device=DEVICE)
    q = fp8_utils.per_tensor_quantize(x)
    assert q.dtype == FP8_DTYPE and not q.float().isnan().any()
    assert q.float().tolist()[:3] == [448.0, -448.0, 3.0]
    for scale in (2.5, torch.tensor(0.5, device=DEVICE)):
        y = randn(64, seed=1)
        back = fp8_utils.per_tensor_dequantize(fp8_utils.per_tensor_quantize(y, scale), scale, torch.float32)
        assert torch.all((back - y).abs() <= REL * y.abs() + SUB * float(scale))
    assert fp8_utils.per_tensor_dequantize(q).dtype == torch.bfloat16


@pytest.mark.parametrize("n, k", SHAPES)
def test_torch_linear_matches_dequantised_weight(n, k, monkeypatch):
    w = randn(n, k, seed=3, scale=0.05)
    bias = randn(n, seed=4)
    q, scale_inv = fp8_utils.quantize_weight_block(w)
    x = randn(7, k, seed=2)
    w_deq = fp8_utils.dequantize_block(q, scale_inv)
    got = fp8_utils.block_fp8_linear_torch(x, q, scale_inv, bias=bias, quantize_activations=False)
    torch.testing.assert_close(got, F.linear(x, w_deq, bias), rtol=1e-5, atol=1e-5)
    # dequantised 128 rows at a time: the same result
    monkeypatch.setattr(fp8_utils, "_DEQUANT_ROWS", 128)
    chunked = fp8_utils.block_fp8_linear_torch(x, q, scale_inv, bias=bias, quantize_activations=False)
    torch.testing.assert_close(chunked, got, rtol=1e-6, atol=1e-6)
    # with the activation round trip: within its bound, in out_dtype, leading dims kept
    y = fp8_utils.block_fp8_linear_torch(x.view(1, 7, k).to(torch.bfloat16), q, scale_inv)
    assert y.shape == (1, 7, n) and y.dtype == torch.bfloat16
    assert torch.all((y[0].float() - F.linear(x.bfloat16().float(), w_deq)).abs() <= _w8a8_bound(x, w_deq, y[0]))


def _w8a8_bound(x: torch.Tensor, w_deq: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|w8a8(x) - x @ w_deq.T| per output: each activation moves by at most 2^-4 |x| + 2^-10 scale
    when rounded to e4m3, the fp32 sum adds ~1e-6, the output's rounding to y's dtype an ulp at most."""
    xf = x.float()
    _, scales = fp8_utils.quantize_activation_per_token_group(xf)
    s = scales.repeat_interleave(128, dim=1)[:, :xf.shape[1]]
    ulp = BF16_RTOL if y.dtype == torch.bfloat16 else 2.0**-20
    return F.linear(REL * xf.abs() + SUB * s, w_deq.abs()) + ulp * y.float().abs() + 1e-5


# ---- Triton kernels (interpreter on CPU) -----------------------------------------------------------


@pytest.mark.parametrize("m, k", [(3, 320), (33, 256), (4, 77), (1, 1280)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_group_quant_kernel_is_bitwise_the_reference(kernels, m, k, dtype):
    x = randn(m, k, seed=m * k, scale=3.0)
    x[0, : min(k, 128)] = 0  # a zero group: the eps floor
    x[-1, -1] = 300.0
    if m > 2:
        x[1] *= torch.logspace(-8, 4, k, device=DEVICE)  # subnormals, ties and large values
    x = x.to(dtype)
    q, scales = kernels.per_token_group_quant_fp8(x)
    q_ref, s_ref = fp8_utils.quantize_activation_per_token_group(x)
    assert q.dtype == FP8_DTYPE and q.shape == (m, k) and scales.shape == s_ref.shape
    assert torch.equal(bits(q), bits(q_ref))
    torch.testing.assert_close(scales, s_ref, rtol=0, atol=0)
    # a strided x (a slice of a wider one) gives the same
    wide = torch.cat([x, x], dim=1)[:, :k]
    assert torch.equal(bits(kernels.per_token_group_quant_fp8(wide)[0]), bits(q_ref))


def test_group_quant_kernel_rounds_ties_to_even(kernels):
    """Every midpoint between neighbouring e4m3 values (subnormals included), in groups led by 448 so
    the scale is exactly 1: the kernel must round each tie as torch's cast does (to even)."""
    grid = torch.arange(0x7F, dtype=torch.uint8).view(FP8_DTYPE).float()  # 0 .. 448, ascending
    mids = (grid[:-1] + grid[1:]) / 2
    vals = torch.cat([mids, -mids, grid, -grid])
    vals = F.pad(vals, (0, -vals.numel() % 127)).view(-1, 127)
    x = torch.cat([torch.full((vals.shape[0], 1), FP8_MAX), vals], dim=1).reshape(1, -1).to(DEVICE)
    q, scales = kernels.per_token_group_quant_fp8(x)
    assert torch.all(scales == 1.0)
    assert torch.equal(bits(q), bits(x.to(FP8_DTYPE)))
    assert torch.equal(bits(q), bits(fp8_utils.quantize_activation_per_token_group(x)[0]))


@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize("n, k", SHAPES)
def test_block_gemm_matches_torch_path(kernels, m, n, k):
    w = randn(n, k, seed=n * k + m, scale=0.05)
    q, scale_inv = fp8_utils.quantize_weight_block(w)
    x = randn(m, k, seed=m).to(torch.bfloat16)
    bias = randn(n, seed=9) if m == 3 else None
    x_fp8, x_scales = kernels.per_token_group_quant_fp8(x)
    # fp32 out: the same products as the torch path, summed in another order
    got = kernels.w8a8_block_fp8_matmul(x_fp8, x_scales, q, scale_inv, out_dtype=torch.float32, bias=bias)
    ref = fp8_utils.block_fp8_linear_torch(x, q, scale_inv, bias=bias, out_dtype=torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the fused entry point, in x's dtype: one bf16 rounding of the same value
    y = kernels.block_fp8_linear(x, q, scale_inv, bias=bias)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    torch.testing.assert_close(y.float(), ref, rtol=BF16_RTOL, atol=1e-5)
    # against the unquantised activation: within the activation rounding bound
    w_deq = fp8_utils.dequantize_block(q, scale_inv)
    exact = F.linear(x.float(), w_deq, bias)
    assert torch.all((y.float() - exact).abs() <= _w8a8_bound(x, w_deq, y))


def test_block_gemm_tiles_and_leading_dims(kernels):
    n, k = 200, 320
    q, scale_inv = fp8_utils.quantize_weight_block(randn(n, k, seed=1, scale=0.05))
    x = randn(2, 9, k, seed=2).to(torch.bfloat16)
    y = kernels.block_fp8_linear(x, q, scale_inv)
    assert y.shape == (2, 9, n)
    ref = fp8_utils.block_fp8_linear_torch(x, q, scale_inv, out_dtype=torch.float32)
    torch.testing.assert_close(y.float(), ref, rtol=BF16_RTOL, atol=1e-5)
    # every M bucket's tile gives the same result (GROUP_M ordering, clamped rows and columns)
    x_fp8, x_scales = kernels.per_token_group_quant_fp8(x.view(-1, k))
    for _, cfg in kernels.GEMM_CONFIGS:
        got = kernels.w8a8_block_fp8_matmul(x_fp8, x_scales, q, scale_inv, out_dtype=torch.float32, config=cfg)
        torch.testing.assert_close(got, ref.view(-1, n), **fp32_gemm_tolerance(ref))
    assert kernels.block_fp8_linear(x[:, :0], q, scale_inv).shape == (2, 0, n)


def test_cublas_block_gemm_only_where_it_fits(kernels, monkeypatch):
    q, scale_inv = fp8_utils.quantize_weight_block(randn(256, 512, seed=3, scale=0.05))
    on_gpu = DEVICE == "cuda" and hasattr(torch.nn.functional, "scaled_mm")
    assert kernels.cublas_block_fp8_fits(q, (128, 128)) == on_gpu
    assert not kernels.cublas_block_fp8_fits(q[:, :384], (128, 128))  # K blocks not a multiple of 4
    assert not kernels.cublas_block_fp8_fits(q, (64, 64))
    x = randn(5, 512, seed=4).to(torch.bfloat16)
    # turned on from one row: cuBLAS where it fits (M = 5 is padded to 8), the Triton GEMM elsewhere
    monkeypatch.setattr(kernels, "GEMM_CUBLAS_MIN_M", 1)
    # a bias as large as the outputs: cancelling against it must not cost the sum's low bits
    for bias in (None, -randn(256, seed=5).to(torch.bfloat16)):
        ref = fp8_utils.block_fp8_linear_torch(x, q, scale_inv, bias=bias, out_dtype=torch.float32)
        got = kernels.block_fp8_linear(x, q, scale_inv, bias=bias)
        assert got.shape == (5, 256) and got.dtype == torch.bfloat16
        tol = fp32_gemm_tolerance(ref)  # then one rounding to bf16
        torch.testing.assert_close(got.float(), ref, rtol=tol["rtol"] + BF16_RTOL, atol=tol["atol"])
    if on_gpu:  # the fp32 sum itself, by cuBLAS
        x_fp8, x_scales = kernels.per_token_group_quant_fp8(x)
        ref = fp8_utils.block_fp8_linear_torch(x, q, scale_inv, out_dtype=torch.float32)
        got = kernels.cublas_block_fp8_matmul(x_fp8, x_scales, q, scale_inv, out_dtype=torch.float32)
        torch.testing.assert_close(got, ref, **fp32_gemm_tolerance(ref))


@pytest.mark.parametrize("n, k", SHAPES + [(64, 5000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_matches_dequantised_linear(kernels, n, k, dtype):
    q, scale_inv = fp8_utils.quantize_weight_block(randn(n, k, seed=n + k, scale=0.05))
    x = randn(1, k, seed=7).to(dtype)
    bias = randn(n, seed=8).to(dtype)
    ref = fp8_utils.block_fp8_linear_torch(x, q, scale_inv, bias=bias, out_dtype=torch.float32,
                                           quantize_activations=False)
    got = kernels.fp8_gemv(x, q, scale_inv, bias=bias)
    assert got.shape == (1, n) and got.dtype == dtype
    rtol = BF16_RTOL if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), ref, rtol=rtol, atol=1e-5)
    assert kernels.fp8_gemv(x.flatten(), q, scale_inv).shape == (n,)
    # both kernels (the word one only where K is whole words: with its loads one step ahead, without,
    # and its pipelined loop), each with a narrow tile too (several programs per scale block, several
    # steps along K, a tail)
    forms = [(True, True, 0), (True, False, 0), (True, False, 3), (False, False, 0)] if k % 4 == 0 else [
        (False, False, 0)]
    for words, prefetch, stages in forms:
        for tile in (None, (2, 64)):
            got = kernels._launch_gemv(x, q, scale_inv, (128, 128), bias, tile=tile, words=words, prefetch=prefetch,
                                       stages=stages)
            torch.testing.assert_close(got.float(), ref, rtol=rtol, atol=1e-5)
    # rows inside a wider buffer (a row stride beyond K): words where the stride is whole words too
    for pad in (4, 3):
        wide = torch.zeros(n, k + pad, dtype=FP8_DTYPE, device=DEVICE)
        wide[:, :k] = q
        assert kernels.gemv_reads_words(wide[:, :k]) == (k % 4 == 0 and pad == 4)
        got = kernels.fp8_gemv(x, wide[:, :k], scale_inv, bias=bias)
        torch.testing.assert_close(got.float(), ref, rtol=rtol, atol=1e-5)


def test_gemv_word_kernel_decodes_every_e4m3_value(kernels):
    """Each of the 254 finite e4m3 codes (subnormals, both zeros, the largest) once per column, against
    the dequantised weight in fp32, with factors far from 1 and an activation that spans the range."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    n, k = 8, 256  # two K groups with their own factors
    w = codes.repeat(n * k // codes.numel() + 1)[: n * k].view(n, k)
    w = torch.stack([row.roll(3 * i) for i, row in enumerate(w)]).view(FP8_DTYPE).to(DEVICE)
    scale_inv = torch.tensor([[2.0**-9, 3.0e3]], device=DEVICE)
    x = (torch.linspace(-8, 8, k) * 10.0 ** torch.linspace(-3, 3, k)).view(1, k).to(DEVICE)
    ref = fp8_utils.block_fp8_linear_torch(x, w, scale_inv, out_dtype=torch.float32, quantize_activations=False)
    for words, stages in ((True, 0), (True, 2), (False, 0)):
        got = kernels._launch_gemv(x, w, scale_inv, (128, 128), None, words=words, stages=stages)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # the word kernel takes rows that are not whole words through the byte kernel
    odd = w[:, :255]
    assert not kernels.gemv_reads_words(odd) and kernels.gemv_reads_words(w)


def silu_mul_in(dtype: torch.dtype, gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU-and-mul rounded as the unfused path rounds it (layers/fused.py): silu(gate), then the product."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate).to(dtype).float() * up).to(dtype)


# (2I, K): several steps along K with a tail, one step, I one scale block (128) and several
@pytest.mark.parametrize("two_i, k", [(256, 5000), (768, 320), (512, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_silu_mul_is_the_gemv_then_the_activation(kernels, two_i, k, dtype, monkeypatch):
    monkeypatch.setattr(kernels, "GEMV_SILU", True)  # off by default (slower on an H100)
    q, scale_inv = fp8_utils.quantize_weight_block(randn(two_i, k, seed=two_i + k, scale=0.05))
    x = randn(1, k, seed=9).to(dtype)
    assert kernels.gemv_silu_mul_fits(q, (128, 128))
    got = kernels.fp8_gemv_silu_mul(x, q, scale_inv)
    assert got.shape == (1, two_i // 2) and got.dtype == dtype
    # the unfused pair: the word GEMV's rounded outputs, then the activation; the same sums in the
    # same order per row, so they agree to the last bit but for a rounding flip of a gate or an up
    unfused = silu_mul_in(dtype, kernels.fp8_gemv(x, q, scale_inv))
    rtol = BF16_RTOL if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), unfused.float(), rtol=2 * rtol, atol=1e-5)
    # and in fp32, the dequantised weight's product (in bf16 a rounding flip of the gate moves silu by
    # up to ~(1 + |gate|) ulps, and the interpreter's fp32 -> bf16 cast truncates: the pair above is the check).
    # Gate and up each hold the plain GEMV's tolerance against the reference (1e-5 + 1e-5 |value|, as in
    # test_gemv_matches_dequantised_linear); the product carries both, weighted by its partial derivatives
    # (an H100 showed 1.17e-5 at K = 5000, 2026-12-07, where the two were 1e-5 each)
    if dtype == torch.float32:
        ref = fp8_utils.block_fp8_linear_torch(x, q, scale_inv, out_dtype=torch.float32,
                                               quantize_activations=False)
        gate, up = ref.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        d_gate = (sig * (1 + gate * (1 - sig)) * up).abs() * (1e-5 + 1e-5 * gate.abs())
        d_up = (gate * sig).abs() * (1e-5 + 1e-5 * up.abs())
        bound = d_gate + d_up + 1e-6
        assert torch.all((got - silu_mul_in(dtype, ref)).abs() <= bound)
    assert kernels.fp8_gemv_silu_mul(x.flatten(), q, scale_inv).shape == (two_i // 2,)


def test_gemv_silu_mul_fits_only_block_aligned_word_rows(kernels, monkeypatch):
    monkeypatch.setattr(kernels, "GEMV_SILU", True)
    q, _ = fp8_utils.quantize_weight_block(randn(512, 256, seed=3, scale=0.05))
    assert kernels.gemv_silu_mul_fits(q, (128, 128))
    assert not kernels.gemv_silu_mul_fits(q[:384], (128, 128))  # I = 192: the up half starts mid-block
    assert kernels.gemv_silu_mul_fits(q[:384], (64, 128))  # 192 = 3 blocks of 64
    assert not kernels.gemv_silu_mul_fits(q[:, :255], (128, 128))  # rows not whole words
    monkeypatch.setattr(kernels, "GEMV_SILU", False)
    assert not kernels.gemv_silu_mul_fits(q, (128, 128))


def fp8_llama_mlp(hidden: int = 192, intermediate: int = 256):
    """The model's MLP with FP8 block weights (random, quantized)."""
    from radixserve.layers.quantization import fp8_linear
    from radixserve.models import llama

    torch.manual_seed(0)
    fp8_linear.set_fp8_config(fp8_linear.Fp8Config(from_checkpoint=True))  # layers built with fp8 weights
    try:
        mlp = llama.LlamaMLP(hidden, intermediate).to(DEVICE)
    finally:
        fp8_linear.set_fp8_config(None)
    for layer in (mlp.gate_up_proj, mlp.down_proj):
        q, scale_inv = fp8_utils.quantize_weight_block(torch.randn(layer.weight.shape) * 0.05)
        layer.weight.data = q.to(DEVICE)
        layer.weight_scale_inv.data = scale_inv.to(DEVICE)
    return mlp


def test_llama_mlp_takes_the_fused_fp8_kernel_for_one_row(kernels, monkeypatch):
    """The model's MLP, FP8 weights, one row: the fused kernel where it fits, the GEMV then the
    activation where it does not (GEMV_SILU off), both through the model's own wiring; several rows
    keep the GEMM."""
    from radixserve.layers.quantization import fp8_linear

    mlp = fp8_llama_mlp()
    # fp32 rows: no intermediate rounding, so the two paths agree to the summation order (in bf16 a
    # rounding flip of one activation moves the down projection's small outputs by a large relative step)
    x = randn(1, 192, seed=4)
    monkeypatch.setattr(fp8_linear, "takes_fp8_kernels", lambda t: True)  # the kernels on CPU (interpreter)
    monkeypatch.setattr(kernels, "GEMV_SILU", True)
    calls: list[str] = []
    for name in ("fp8_gemv", "fp8_gemv_silu_mul"):
        real = getattr(fp8_linear, name)
        monkeypatch.setattr(fp8_linear, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    fused = mlp(x)
    assert calls == ["fp8_gemv_silu_mul", "fp8_gemv"]
    assert mlp(x.to(torch.bfloat16)).dtype == torch.bfloat16
    calls.clear()
    mlp(torch.cat([x, x]))  # two rows: the GEMM path
    assert calls == []
    monkeypatch.setattr(kernels, "GEMV_SILU", False)
    unfused = mlp(x)
    assert calls == ["fp8_gemv", "fp8_gemv"]
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5 * unfused.abs().max().item())


def test_torch_compile_keeps_the_fused_fp8_kernel_for_one_row(kernels, monkeypatch):
    """Under torch.compile (--enable-torch-compile's decode graphs) a one-row FP8 MLP traces the fused
    op and the GEMV op and computes what eager does; a dynamic batch traces neither."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from radixserve.layers.quantization import fp8_linear

    mlp = fp8_llama_mlp()
    monkeypatch.setattr(fp8_linear, "takes_fp8_kernels", lambda t: True)
    monkeypatch.setattr(kernels, "GEMV_SILU", True)
    traced: list[set[str]] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        traced.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(mlp, backend=recording_backend, fullgraph=True)
    try:
        with torch.no_grad():
            x = randn(1, 192, seed=5)
            torch.testing.assert_close(compiled(x), mlp(x), rtol=1e-5, atol=1e-6)
            assert {"radixserve.fp8_gemv_silu_mul.default", "radixserve.fp8_gemv.default"} <= traced[-1], traced
            rows = randn(3, 192, seed=6)
            torch._dynamo.mark_dynamic(rows, 0)
            torch.testing.assert_close(compiled(rows), mlp(rows), rtol=1e-5, atol=1e-6)
            assert "radixserve.fp8_gemv_silu_mul.default" not in traced[-1], traced
    finally:
        torch._dynamo.reset()


def test_custom_ops_fake_shapes_and_eager(kernels):
    from torch._subclasses.fake_tensor import FakeTensorMode

    n, k = 200, 320
    q, scale_inv = fp8_utils.quantize_weight_block(randn(n, k, seed=1, scale=0.05))
    x = randn(2, 5, k, seed=2).to(torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.ops.radixserve.block_fp8_linear(x, q, scale_inv, [128, 128], None)
        g = torch.ops.radixserve.fp8_gemv(x[:1, :1], q, scale_inv, [128, 128], None)
        a = torch.ops.radixserve.fp8_gemv_silu_mul(x[:1, :1], q[:128], scale_inv[:1], [128, 128])
    assert y.shape == (2, 5, n) and y.dtype == torch.bfloat16
    assert a.shape == (1, 1, 64) and a.dtype == torch.bfloat16
    assert g.shape == (1, 1, n) and g.dtype == torch.bfloat16
    # the op runs the same launch as the eager entry point
    eager = kernels.block_fp8_linear(x, q, scale_inv)
    assert torch.equal(torch.ops.radixserve.block_fp8_linear(x, q, scale_inv, [128, 128], None), eager)


def test_takes_fp8_kernels_only_on_cuda(kernels):
    assert not kernels.takes_fp8_kernels(torch.randn(2, 8))
