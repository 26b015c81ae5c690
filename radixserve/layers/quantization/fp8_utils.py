"""FP8 (e4m3fn) formats in plain torch: the reference numerics and the CPU path.

Weights are stored as DeepSeek-V3 checkpoints store them: w_fp8 [N, K] plus `weight_scale_inv`
[ceil(N/bn), ceil(K/bk)] fp32, one factor per (bn x bk) block (128 x 128), such that
w ~= w_fp8.float() * scale_inv[n // bn, k // bk]. Activations are quantised on the fly, one scale per
(row, group of 128 along K), so the GEMM can apply both scales once per 128-wide K step.

Every quantiser here computes scale = max(amax, EPS) * (1 / FP8_MAX) and q = clamp(x / scale) in fp32 and
casts with round-to-nearest-even; fp8_kernels.py's Triton quantiser reproduces that bit for bit. The
clamp matters: e4m3fn has no infinity, and an out-of-range cast gives NaN on some torch versions
(saturation on others), so nothing relies on the cast to saturate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# amax floor: an all-zero row or block gets a tiny scale instead of dividing by zero (its q is 0)
EPS = 1e-10
# rows of the weight dequantised at once on the CPU path: bounds the fp32 copy (64 MiB at K = 4096)
_DEQUANT_ROWS = 4096


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _to_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """clamp(x / scale) cast to e4m3fn; x fp32, scale broadcastable to it."""
    return (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _scale_of(amax: Tensor) -> Tensor:
    # a multiply by fp32(1/448), not a division: CUDA torch turns division by a scalar into that
    # multiply anyway, and this way CPU, CUDA and the Triton kernel all round the same way
    return amax.clamp(min=EPS) * (1.0 / FP8_MAX)


def _pad_to(x: Tensor, rows: int, cols: int) -> Tensor:
    """x [R, C] zero-padded to [rows, cols] (no copy when already that size); zeros leave amax alone."""
    if x.shape == (rows, cols):
        return x
    return F.pad(x, (0, cols - x.shape[1], 0, rows - x.shape[0]))


def quantize_weight_block(w: Tensor, block: tuple[int, int] = (128, 128)) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (w_fp8 [N, K], scale_inv [ceil(N/bn), ceil(K/bk)] fp32): one amax scale per block;
    edge blocks (N or K not a multiple of the block) take the amax of the part that exists."""
    n, k = w.shape
    bn, bk = block
    nb, kb = _cdiv(n, bn), _cdiv(k, bk)
    wp = _pad_to(w.float(), nb * bn, kb * bk).view(nb, bn, kb, bk)
    scale = _scale_of(wp.abs().amax(dim=(1, 3)))  # [nb, kb]
    q = _to_fp8(wp, scale[:, None, :, None]).view(nb * bn, kb * bk)[:n, :k].contiguous()
    return q, scale


def quantize_weight_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (w_fp8 [N, K], scale [N, 1] fp32): one scale per output row; w ~= w_fp8 * scale."""
    wf = w.float()
    scale = _scale_of(wf.abs().amax(dim=1, keepdim=True))
    return _to_fp8(wf, scale), scale


def expand_block_scales(scale_inv: Tensor, shape: tuple[int, int], block: tuple[int, int]) -> Tensor:
    """scale_inv [nb, kb] -> [N, K]: each block's factor repeated over its elements."""
    n, k = shape
    bn, bk = block
    return scale_inv.repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]


def dequantize_block(w_fp8: Tensor, scale_inv: Tensor, block: tuple[int, int] = (128, 128),
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """The reference: w_fp8 [N, K] times its block factors, computed in fp32, returned in dtype."""
    assert scale_inv.shape == (_cdiv(w_fp8.shape[0], block[0]), _cdiv(w_fp8.shape[1], block[1])), (
        w_fp8.shape, scale_inv.shape, block)
    w = w_fp8.float() * expand_block_scales(scale_inv.float(), tuple(w_fp8.shape), block)
    return w.to(dtype)


def quantize_activation_per_token_group(x: Tensor, group: int = 128) -> tuple[Tensor, Tensor]:
    """x [..., K] -> (x_fp8 [..., K], scales [..., ceil(K/group)] fp32): dynamic, one amax scale per
    (row, group of `group` columns); x ~= x_fp8 * scales[..., k // group]."""
    *lead, k = x.shape
    g = _cdiv(k, group)
    x2 = x.reshape(-1, k).float()
    xp = _pad_to(x2, x2.shape[0], g * group).view(-1, g, group)
    scale = _scale_of(xp.abs().amax(dim=2))  # [M, G]
    q = _to_fp8(xp, scale[:, :, None]).view(-1, g * group)[:, :k]
    return q.reshape(*lead, k).contiguous(), scale.reshape(*lead, g)


def dequantize_per_token_group(x_fp8: Tensor, scales: Tensor, group: int = 128,
                               dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of quantize_activation_per_token_group, computed in fp32."""
    k = x_fp8.shape[-1]
    expanded = scales.float().repeat_interleave(group, dim=-1)[..., :k]
    return (x_fp8.float() * expanded).to(dtype)


def block_fp8_linear_torch(x: Tensor, w_fp8: Tensor, scale_inv: Tensor, block: tuple[int, int] = (128, 128),
                           bias: Tensor | None = None, out_dtype: torch.dtype | None = None,
                           quantize_activations: bool = True) -> Tensor:
    """y = x @ dequant(w).T (+ bias) in fp32, rounded to out_dtype (x's dtype by default): the CPU
    path and the reference for the Triton GEMM. With quantize_activations (the default) x first goes
    through the per-token-group fp8 round trip the GPU kernel applies, so both see the same inputs and
    differ only in summation order; without it this is the bf16-activation (GEMV) numerics.

    The weight is dequantised on every call, _DEQUANT_ROWS rows at a time, so the fp32 copy never
    holds the whole matrix."""
    out_dtype = out_dtype or x.dtype
    n, k = w_fp8.shape
    lead = x.shape[:-1]
    xf = x.reshape(-1, k).float()
    if quantize_activations:
        xf = dequantize_per_token_group(*quantize_activation_per_token_group(xf, block[1]), group=block[1])
    bn = block[0]
    rows = max(bn, _DEQUANT_ROWS // bn * bn)  # block-aligned chunks of the weight
    parts = []
    for r in range(0, n, rows):
        w = dequantize_block(w_fp8[r:r + rows], scale_inv[r // bn:_cdiv(r + rows, bn)], block)
        parts.append(F.linear(xf, w))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype).reshape(*lead, n)


def per_tensor_quantize(x: Tensor, scale: float | Tensor = 1.0) -> Tensor:
    """x -> e4m3fn with one scale (the FP8 KV cache: one per layer, 1.0 by default); x ~= q * scale.
    Clamped to +-448 first: past it an e4m3fn cast can give NaN (the format has no infinity)."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def per_tensor_dequantize(x_fp8: Tensor, scale: float | Tensor = 1.0,
                          dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """q * scale in fp32, returned in dtype."""
    return (x_fp8.float() * scale).to(dtype)
