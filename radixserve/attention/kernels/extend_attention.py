"""Extend (prefill) attention over the paged KV pool, flash-attention style.

Grid (bs, q_heads, ceil(max_extend_len / BLOCK_M)): one program takes BLOCK_M consecutive new tokens
of one request and one query head, and walks the keys in two phases:

1. the cached prefix (positions 0..prefix-1), gathered from the pool through the request's
   req_to_token row (any page size); every query sees all of it, so only a ragged last block is masked;
2. the new tokens themselves, read contiguously from this batch's k/v (the tensors the backend also
   writes into the pool), with the causal mask applied only on blocks along the diagonal.

Reading the new tokens' K/V straight from the projection output rather than through the table keeps the
bulk of a fresh prefill a plain strided stream, which the compiler can pipeline like dense attention.

An fp8 pool (KV_FP8, --kv-cache-dtype fp8_e4m3) changes phase 2: the new tokens' K/V are read back
from the pool through the table (positions prefix..prefix+extend-1; the backend stores them first),
not from the bf16 projection output. Each query then sees exactly the rounded values decode steps and
later requests reusing this prefix will see, so a request's output does not depend on whether its
prefix came from the cache or was computed in the same pass (or in another chunk). The layer's
k_scale multiplies the scores (folded into the softmax scale), its v_scale the output.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton before 3.4: pointer loads only
    TensorDescriptor = None

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(q, k, v, m_i, l_i, acc, sm_scale_log2, visible, MASKED: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """One online-softmax step over a key block: returns the updated (m_i, l_i, acc). The softmax scale
    is folded into the exponent (one FMA per score) rather than applied to the scores first."""
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * sm_scale_log2)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * sm_scale_log2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _extend_kernel(
    Q, KNew, VNew, KNewDesc, VNewDesc, KBuf, VBuf, Out, ReqToToken, ReqPoolIdx, PrefixLens, ExtendLens, ExtendStart,
    sm_scale_log2, k_scale, v_scale,
    stride_qt, stride_qh,
    stride_knt, stride_knh,
    stride_vnt, stride_vnh,
    stride_kbt, stride_kbh,
    stride_vbt, stride_vbh,
    stride_ot, stride_oh,
    stride_rt,
    GROUP: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, KV_FP8: tl.constexpr,
):
    # A tile's BLOCK_M rows are TOK tokens x PACK query heads of one KV group (row r: token r // PACK,
    # head r % PACK), so the group's heads share each K/V block load and the causal diagonal is shorter.
    TOK: tl.constexpr = BLOCK_M // PACK
    b = tl.program_id(0)
    h0 = tl.program_id(1) * PACK
    mb = tl.num_programs(2) - 1 - tl.program_id(2)  # the longest rows (most keys) start first

    if KV_FP8:  # stored k = real k / k_scale: scale the scores instead of every key
        sm_scale_log2 = sm_scale_log2 * k_scale
    ext_len = tl.load(ExtendLens + b).to(tl.int32)
    if mb * TOK < ext_len:
        prefix = tl.load(PrefixLens + b).to(tl.int32)
        q_start = tl.load(ExtendStart + b).to(tl.int64)
        kvh = h0 // GROUP

        offs_r = tl.arange(0, BLOCK_M)
        offs_m = mb * TOK + offs_r // PACK  # each row's token, within the request's new tokens
        heads = h0 + offs_r % PACK
        offs_d = tl.arange(0, BLOCK_D)
        offs_bn = tl.arange(0, BLOCK_N)
        mask_m = offs_m < ext_len
        mask_d = offs_d < HEAD_DIM
        row_q = (q_start + offs_m) * stride_qt + heads * stride_qh
        q = tl.load(Q + row_q[:, None] + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # Phase 1: the cached prefix, through the table. Full blocks need no mask at all.
        slot_row = ReqToToken + tl.load(ReqPoolIdx + b).to(tl.int64) * stride_rt
        kb_ptrs = KBuf + kvh * stride_kbh + offs_d[None, :]
        vb_ptrs = VBuf + kvh * stride_vbh + offs_d[None, :]
        prefix_full = prefix // BLOCK_N * BLOCK_N
        for n0 in range(0, prefix_full, BLOCK_N):
            slots = tl.load(slot_row + n0 + offs_bn).to(tl.int64)
            k = tl.load(kb_ptrs + slots[:, None] * stride_kbt, mask=mask_d[None, :], other=0.0)
            v = tl.load(vb_ptrs + slots[:, None] * stride_vbt, mask=mask_d[None, :], other=0.0)
            m_i, l_i, acc = _attend_block(q, k, v, m_i, l_i, acc, sm_scale_log2, None, False, DOT_PRECISION)
        if prefix_full < prefix:
            offs_n = prefix_full + offs_bn
            mask_n = offs_n < prefix
            slots = tl.load(slot_row + offs_n, mask=mask_n, other=0).to(tl.int64)
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(kb_ptrs + slots[:, None] * stride_kbt, mask=kv_mask, other=0.0)
            v = tl.load(vb_ptrs + slots[:, None] * stride_vbt, mask=kv_mask, other=0.0)
            m_i, l_i, acc = _attend_block(q, k, v, m_i, l_i, acc, sm_scale_log2, mask_n[None, :], True,
                                          DOT_PRECISION)

        # Phase 2: the new tokens, contiguous in this batch. New key j is visible to new query i when
        # j <= i; keys before this block's first query are visible to every row, so skip the mask there.
        kn_ptrs = KNew + (q_start + offs_bn)[:, None] * stride_knt + kvh * stride_knh + offs_d[None, :]
        vn_ptrs = VNew + (q_start + offs_bn)[:, None] * stride_vnt + kvh * stride_vnh + offs_d[None, :]
        full_end = (mb * TOK) // BLOCK_N * BLOCK_N
        # With TMA (Hopper on), the descriptors view k/v as [T, Hk * D]: row q_start + n0, column kvh * D.
        # Rows past T come back as zeros; rows of the next request are masked out like any future key.
        tma_row = q_start.to(tl.int32)
        tma_col = kvh * HEAD_DIM
        new_row = slot_row + prefix  # fp8: the new tokens' slots, positions prefix.. of the table row
        for n0 in range(0, full_end, BLOCK_N):
            if KV_FP8:
                slots = tl.load(new_row + n0 + offs_bn).to(tl.int64)
                k = tl.load(kb_ptrs + slots[:, None] * stride_kbt, mask=mask_d[None, :], other=0.0)
                v = tl.load(vb_ptrs + slots[:, None] * stride_vbt, mask=mask_d[None, :], other=0.0)
            elif USE_TMA:
                k = KNewDesc.load([tma_row + n0, tma_col])
                v = VNewDesc.load([tma_row + n0, tma_col])
            else:
                # int64: n0 * stride passes 2^31 at long prefills (tl.cast: n0 is a Python int when interpreted)
                k = tl.load(kn_ptrs + tl.cast(n0, tl.int64) * stride_knt, mask=mask_d[None, :], other=0.0)
                v = tl.load(vn_ptrs + tl.cast(n0, tl.int64) * stride_vnt, mask=mask_d[None, :], other=0.0)
            m_i, l_i, acc = _attend_block(q, k, v, m_i, l_i, acc, sm_scale_log2, None, False, DOT_PRECISION)
        kv_end = tl.minimum(ext_len, (mb + 1) * TOK)
        for n0 in range(full_end, kv_end, BLOCK_N):
            offs_n = n0 + offs_bn
            mask_n = offs_n < kv_end
            if KV_FP8:
                slots = tl.load(new_row + offs_n, mask=mask_n, other=0).to(tl.int64)
                kv_mask = mask_n[:, None] & mask_d[None, :]
                k = tl.load(kb_ptrs + slots[:, None] * stride_kbt, mask=kv_mask, other=0.0)
                v = tl.load(vb_ptrs + slots[:, None] * stride_vbt, mask=kv_mask, other=0.0)
            elif USE_TMA:
                k = KNewDesc.load([tma_row + n0, tma_col])
                v = VNewDesc.load([tma_row + n0, tma_col])
            else:
                kv_mask = mask_n[:, None] & mask_d[None, :]
                k = tl.load(kn_ptrs + tl.cast(n0, tl.int64) * stride_knt, mask=kv_mask, other=0.0)
                v = tl.load(vn_ptrs + tl.cast(n0, tl.int64) * stride_vnt, mask=kv_mask, other=0.0)
            # New key 0 is visible to every query, so no row is left at -inf when it is divided.
            visible = mask_n[None, :] & (offs_n[None, :] <= offs_m[:, None])
            m_i, l_i, acc = _attend_block(q, k, v, m_i, l_i, acc, sm_scale_log2, visible, True, DOT_PRECISION)

        out = acc / l_i[:, None]
        if KV_FP8:
            out = out * v_scale
        row_o = (q_start + offs_m) * stride_ot + heads * stride_oh
        tl.store(Out + row_o[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=mask_m[:, None] & mask_d[None, :])


@dataclass(frozen=True)
class ExtendConfig:
    """Tile shape and launch options. The q tile and the fp32 accumulator [BLOCK_M, BLOCK_D] live in
    registers, so wide heads get shorter tiles; fp32 tiles take twice the shared memory."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    pack: int = 1  # query heads of one KV group per tile, at most (the largest power of two dividing both)
    tma: bool = False  # new tokens' K/V through TMA descriptors where the GPU and layout allow it


def extend_config(head_dim: int, dtype: torch.dtype) -> ExtendConfig:
    """Tiles chosen by the sweep in scripts/gpu_extend_attention_bench.py (docs/gpu.md has its figures).
    Without TMA (older GPUs, odd head_dim) the same tiles run through pointer loads."""
    block_d = triton.next_power_of_2(head_dim)
    if block_d <= 128:
        cfg = ExtendConfig(128, 64, 4, 2, tma=True)
    else:
        cfg = ExtendConfig(64, 32, 8, 2, tma=True)
    if dtype.itemsize > 2:  # fp32: half the rows, so the tiles fit
        cfg = replace(cfg, block_m=cfg.block_m // 2, num_stages=2)
    return cfg


@functools.cache
def _capability_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]  # asked once per device, not once per layer


def tma_usable(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> bool:
    """TMA needs Hopper or newer (or the interpreter), a power-of-two head_dim (a tile never crosses into
    the next head), each token's heads in one contiguous row, and 16-byte aligned bases and row strides."""
    if TensorDescriptor is None:
        return False
    if q.is_cuda and _capability_major(q.device) < 9:
        return False
    head_dim = k_new.shape[2]
    if head_dim != triton.next_power_of_2(head_dim):
        return False
    for x in (k_new, v_new):
        if x.stride(2) != 1 or x.stride(1) != head_dim or x.data_ptr() % 16 or (x.stride(0) * x.element_size()) % 16:
            return False
    return True


def extend_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_start_loc: torch.Tensor,
    out: torch.Tensor,
    scaling: float,
    max_extend_len: int,
    config: ExtendConfig | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """q [T, Hq, D] and k_new/v_new [T, Hk, D]: request i's new tokens are rows
    extend_start_loc[i] : + extend_lens[i], at absolute positions prefix_lens[i] + j. The cached prefix
    (positions 0..prefix-1) is read from k/v_buf [slots, Hk, D] through req_to_token[req_pool_indices[i]].
    Writes out [T, Hq, D]. `config` overrides the tile choice (for tuning).

    float8_e4m3fn k/v_buf (the FP8 KV cache) hold K / k_scale and V / v_scale, and must already hold
    the new tokens at req_to_token[req_pool_indices[i], prefix_lens[i]:][:extend_lens[i]]: the kernel
    reads them there, and k_new/v_new only for their shapes."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_buf.shape[1]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert k_new.shape == v_new.shape == (num_tokens, num_kv_heads, head_dim), (k_new.shape, v_new.shape)
    for t in (q, k_new, v_new, k_buf, v_buf, out):
        assert t.stride(2) == 1, "the head dimension must be contiguous"
    assert req_to_token.stride(1) == 1
    bs = req_pool_indices.shape[0]
    if bs == 0 or num_tokens == 0 or max_extend_len <= 0:
        return out
    cfg = config or extend_config(head_dim, q.dtype)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 must not round through tf32
    group = num_heads // num_kv_heads
    pack = math.gcd(cfg.pack, group, cfg.block_m)
    grid = (bs, num_heads // pack, triton.cdiv(max_extend_len, cfg.block_m // pack))
    kv_fp8 = k_buf.dtype == torch.float8_e4m3fn
    assert v_buf.dtype == k_buf.dtype
    k_desc = v_desc = None
    if cfg.tma and not kv_fp8 and tma_usable(q, k_new, v_new):
        k_desc, v_desc = (TensorDescriptor(x, [num_tokens, num_kv_heads * head_dim], [x.stride(0), 1],
                                           [cfg.block_n, head_dim]) for x in (k_new, v_new))
    _extend_kernel[grid](
        q, k_new, v_new, k_desc, v_desc, k_buf, v_buf, out, req_to_token, req_pool_indices, prefix_lens, extend_lens,
        extend_start_loc,
        scaling * _LOG2E, float(k_scale), float(v_scale),
        q.stride(0), q.stride(1),
        k_new.stride(0), k_new.stride(1),
        v_new.stride(0), v_new.stride(1),
        k_buf.stride(0), k_buf.stride(1),
        v_buf.stride(0), v_buf.stride(1),
        out.stride(0), out.stride(1),
        req_to_token.stride(0),
        GROUP=group, PACK=pack, HEAD_DIM=head_dim,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        DOT_PRECISION=precision, USE_TMA=k_desc is not None, KV_FP8=kv_fp8,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
