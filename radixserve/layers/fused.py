"""Fused Triton kernels for the element-wise work between GEMMs: RMSNorm (with the residual add),
SiLU-and-mul, and rotary embedding in place. Each replaces 4-10 small torch kernels per call; they
run on CUDA (and under TRITON_INTERPRET=1 for tests). The torch code in norm.py / activation.py /
rotary.py stays the reference and the CPU path."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixserve.layers.quantization.fp8_kernels import _interpreting, _to_fp8
from radixserve.layers.quantization.fp8_utils import FP8_DTYPE


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, x_stride, res_stride, out_stride,
                    eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 in long prefills
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
        # round the sum to the activation dtype first, as the unfused `x + residual` does
        x = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
        x = x.to(tl.float32)
    var = tl.sum(x * x, axis=0) / n_cols
    normed = (x * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * out_stride + cols, (normed.to(tl.float32) * w.to(tl.float32)).to(
        out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [..., H]. With residual: returns (norm(x + residual), x + residual)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, cols = x2.shape
    out = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    res2 = res_out = None
    if residual is not None:
        res2 = residual.reshape(-1, cols)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
        res_out = torch.empty_like(out)
    block = triton.next_power_of_2(cols)
    _rmsnorm_kernel[(rows,)](
        x2, res2 if res2 is not None else x2, weight, out, res_out if res_out is not None else out, cols,
        x2.stride(0), res2.stride(0) if res2 is not None else 0, out.stride(0), eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )
    if residual is None:
        return out.view(shape)
    return out.view(shape), res_out.view(shape)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n_cols, x_stride, BLOCK: tl.constexpr):
    # int64: row * stride passes 2^31 in long prefills (131,072 tokens x 2 x 10,944 did, on a GPU)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2N] (gate then up) -> silu(gate) * up [..., N]."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, n = x2.shape[0], x2.shape[1] // 2
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](x2, out, n, x2.stride(0), BLOCK=block)
    return out.view(*x.shape[:-1], n)


@triton.jit
def _rotary_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, n_heads, x_stride_t, x_stride_h, cache_stride,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)  # int64: tok * stride passes 2^31 in long prefills
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    dmask = dims < HALF
    cos = tl.load(cos_ptr + pos * cache_stride + dims, mask=dmask, other=0.0)
    sin = tl.load(sin_ptr + pos * cache_stride + dims, mask=dmask, other=0.0)
    mask = (heads[:, None] < n_heads) & dmask[None, :]
    base = x_ptr + tok * x_stride_t + heads[:, None] * x_stride_h + dims[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    tl.store(base, (x1 * cos[None, :] - x2 * sin[None, :]).to(dtype), mask=mask)
    tl.store(base + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(dtype), mask=mask)


def rotary_inplace(x: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                   sin_cache: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] (neox layout) in place; cos/sin caches [max_pos, D] fp32 (halves repeated)."""
    tokens, heads, dim = x.shape
    assert x.stride(-1) == 1
    half = dim // 2
    block_h = min(16, triton.next_power_of_2(heads))
    _rotary_kernel[(tokens, triton.cdiv(heads, block_h))](
        x, positions, cos_cache, sin_cache, heads, x.stride(0), x.stride(1), cos_cache.stride(0),
        HALF=half, BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(half),
    )
    return x


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_buf_ptr, v_buf_ptr, slots_ptr, n_tokens, k_stride, v_stride,
                     k_buf_stride, v_buf_stride, k_scale, v_scale, ROW: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_C: tl.constexpr, QUANT_FP8: tl.constexpr, EXACT_CAST: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_t = offs_t < n_tokens
    mask = mask_t[:, None] & (offs_c < ROW)[None, :]
    slots = tl.load(slots_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    k = tl.load(k_ptr + offs_t[:, None].to(tl.int64) * k_stride + offs_c[None, :], mask=mask)
    if QUANT_FP8:  # clamp(x / scale) to e4m3, as fp8_utils.per_tensor_quantize (IEEE division, like torch)
        k = _to_fp8(tl.math.div_rn(k.to(tl.float32), k_scale), EXACT_CAST)
    tl.store(k_buf_ptr + slots[:, None] * k_buf_stride + offs_c[None, :], k.to(k_buf_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + offs_t[:, None].to(tl.int64) * v_stride + offs_c[None, :], mask=mask)
    if QUANT_FP8:
        v = _to_fp8(tl.math.div_rn(v.to(tl.float32), v_scale), EXACT_CAST)
    tl.store(v_buf_ptr + slots[:, None] * v_buf_stride + offs_c[None, :], v.to(v_buf_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
             slots: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k_buf[slots] = k and v_buf[slots] = v in one launch, for k/v [T, H, D] whose rows are each one
    contiguous run of H*D values (as views of the fused qkv projection are). Torch's advanced-index
    write handles one element at a time; this moves whole rows, at copy speed. Into float8_e4m3fn
    buffers (the FP8 KV cache) it stores clamp(x / scale, +-448) as e4m3, per_tensor_quantize's values."""
    tokens = slots.shape[0]
    row = k_buf.shape[1] * k_buf.shape[2]
    if tokens == 0:
        return
    quant = k_buf.dtype == FP8_DTYPE
    assert v_buf.dtype == k_buf.dtype
    block_c = min(1024, triton.next_power_of_2(row))
    block_t = max(1, 4096 // block_c)
    grid = (triton.cdiv(tokens, block_t), triton.cdiv(row, block_c))
    _store_kv_kernel[grid](k, v, k_buf, v_buf, slots, tokens, k.stride(0), v.stride(0), k_buf.stride(0),
                           v_buf.stride(0), float(k_scale), float(v_scale), ROW=row, BLOCK_T=block_t,
                           BLOCK_C=block_c, QUANT_FP8=quant, EXACT_CAST=quant and _interpreting())


def rows_are_contiguous(x: torch.Tensor) -> bool:
    """True when each x[t] ([H, D]) is one contiguous run: strides (any, D, 1)."""
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]
