"""Extend (prefill) attention over the paged KV pool, flash-attention style.

Grid (bs, q_heads, ceil(max_extend_len / BLOCK_M)): one program takes BLOCK_M consecutive new tokens
of one request and one query head. The new tokens' K/V are already in the pool (the backend writes
them first), so the program reads every key, cached prefix and new tokens alike, through the
request's req_to_token row, and applies the causal mask at absolute positions: query j of a request
with prefix p sits at position p + j and sees keys 0..p + j. One loop, one code path, any page
size; the cost is gathering the new tokens' K/V rather than reading them contiguously.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _extend_kernel(
    Q, K, V, Out, ReqToToken, ReqPoolIdx, PrefixLens, ExtendLens, ExtendStart,
    sm_scale_log2,
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_rt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    mb = tl.num_programs(2) - 1 - tl.program_id(2)  # the longest rows (most keys) start first

    ext_len = tl.load(ExtendLens + b).to(tl.int32)
    if mb * BLOCK_M < ext_len:
        prefix = tl.load(PrefixLens + b).to(tl.int32)
        q_start = tl.load(ExtendStart + b).to(tl.int64)
        row = tl.load(ReqPoolIdx + b)
        slot_row = ReqToToken + row * stride_rt
        kvh = h // GROUP

        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < ext_len
        mask_d = offs_d < HEAD_DIM
        q = tl.load(
            Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :], other=0.0,
        )
        q_pos = prefix + offs_m  # absolute positions

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # The last query of this block sits at prefix + min(ext_len, (mb+1)*BLOCK_M) - 1. Keys before
        # the first query's position are visible to every query of the block: those blocks skip the
        # causal mask; only the blocks along the diagonal apply it.
        kv_end = prefix + tl.minimum(ext_len, (mb + 1) * BLOCK_M)
        full_end = (prefix + mb * BLOCK_M + 1) // BLOCK_N * BLOCK_N
        for n0 in range(0, full_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            slots = tl.load(slot_row + offs_n)
            k = tl.load(K + slots[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :],
                        mask=mask_d[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * sm_scale_log2
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + slots[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
                        mask=mask_d[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
            m_i = m_new
        for n0 in range(full_end, kv_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < kv_end
            slots = tl.load(slot_row + offs_n, mask=mask_n, other=0)
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(K + slots[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * sm_scale_log2
            # Key 0 is visible to every query, so no row is left at -inf by the time it is divided.
            visible = mask_n[None, :] & (offs_n[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + slots[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
            m_i = m_new

        out = acc / l_i[:, None]
        tl.store(
            Out + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
            out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :],
        )


def extend_block_sizes(head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps): the q tile and the fp32 accumulator
    [BLOCK_M, BLOCK_D] live in registers, so wide heads get shorter tiles."""
    block_d = triton.next_power_of_2(head_dim)
    if block_d <= 64:
        return 128, 64, block_d, 4
    if block_d <= 128:
        return 128, 64, block_d, 8
    return 64, 32, block_d, 8


def extend_attention(
    q: torch.Tensor,
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
) -> torch.Tensor:
    """q [T, Hq, D]: request i's new tokens are q[extend_start_loc[i] : + extend_lens[i]], at absolute
    positions prefix_lens[i] + j. Keys/values for positions 0..prefix+extend-1 are read from k/v_buf
    [slots, Hk, D] through req_to_token[req_pool_indices[i]]. Writes out [T, Hq, D]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_buf.shape[1]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert q.stride(2) == 1 and k_buf.stride(2) == 1 and v_buf.stride(2) == 1 and out.stride(2) == 1
    assert req_to_token.stride(1) == 1
    bs = req_pool_indices.shape[0]
    if bs == 0 or num_tokens == 0 or max_extend_len <= 0:
        return out
    block_m, block_n, block_d, num_warps = extend_block_sizes(head_dim)
    if q.element_size() > 2:  # fp32 tiles take twice the shared memory
        block_m //= 2
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 must not round through tf32
    grid = (bs, num_heads, triton.cdiv(max_extend_len, block_m))
    _extend_kernel[grid](
        q, k_buf, v_buf, out, req_to_token, req_pool_indices, prefix_lens, extend_lens, extend_start_loc,
        scaling * _LOG2E,
        q.stride(0), q.stride(1),
        k_buf.stride(0), k_buf.stride(1),
        v_buf.stride(0), v_buf.stride(1),
        out.stride(0), out.stride(1),
        req_to_token.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=precision,
        num_warps=num_warps, num_stages=2,
    )
    return out
