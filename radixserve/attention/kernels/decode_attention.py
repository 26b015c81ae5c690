"""Split-KV flash-decoding over the paged KV pool (one query token per request).

Stage 1, grid (bs, kv_heads, max_splits): one program takes one KV head and one contiguous slice
(split) of a request's context. All the query heads of that KV head's group are processed together
as the rows of one [BLOCK_H, D] tile, so every K/V row is loaded once per group rather than once per
query head. K/V rows are gathered through the request's req_to_token row, so the page size never
matters. The program writes its normalised partial output and its log-sum-exp (base 2) to a
workspace.

Stage 2, grid (bs, q_heads): merges the splits of one (request, head) with softmax weights taken
from the log-sum-exps.

An fp8 pool (KV_FP8): K/V tiles are loaded as e4m3 and upcast to q's dtype for the dots; the layer's
k_scale multiplies the scores (folded into the softmax scale) and its v_scale the split's output, so
no dequantised tile is ever rounded back to bf16. The bf16/fp32 path compiles without either.

How many splits: the grid's split dimension (`max_splits`) is planned on the host from the batch size
and the longest sequence (`plan_max_splits`); each request then uses
`clamp(ceil(seq_len / min_split_tokens), 1, max_splits)` splits, computed on the device
(`fill_num_splits`), so short requests in a batch with one long one don't pay for empty splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# A split shorter than this costs more in its fixed work (query load, workspace write, its share
# of the merge) than the parallelism it adds. Small batches need short splits: each program walks
# its split serially, one dependent slot -> K -> V load chain per block, so at batch 1 long splits
# leave most of the GPU idle (docs/gpu.md has the timings).
MIN_SPLIT_TOKENS = 64
# Enough programs to fill the GPU a few times over; beyond that splitting only adds merge work.
WAVES_PER_SM = 4
MAX_SPLITS = 64
_LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    Q, K, V, ReqToToken, ReqPoolIdx, SeqLens, NumSplits, Acc, Lse,
    sm_scale_log2, k_scale, v_scale,
    stride_qb, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_rt,
    stride_ab, stride_ah, stride_as,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # int64: b * stride_ab passes 2^31 at a few hundred requests
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if KV_FP8:  # stored k = real k / k_scale: scale the scores instead of every key
        sm_scale_log2 = sm_scale_log2 * k_scale

    seq_len = tl.load(SeqLens + b).to(tl.int32)
    n_splits = tl.load(NumSplits + b)
    # Balanced boundaries: every split is non-empty whenever n_splits <= seq_len.
    start = split * seq_len // n_splits
    end = (split + 1) * seq_len // n_splits
    if (split < n_splits) & (start < end):
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask_h = offs_h < GROUP
        mask_d = offs_d < HEAD_DIM
        heads = kvh * GROUP + offs_h

        q = tl.load(
            Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=mask_h[:, None] & mask_d[None, :], other=0.0,
        )
        row = tl.load(ReqPoolIdx + b).to(tl.int64)
        slot_row = ReqToToken + row * stride_rt

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            slots = tl.load(slot_row + offs_n, mask=mask_n, other=0).to(tl.int64)
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(K + slots[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * sm_scale_log2
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + slots[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
            v = v.to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        out_mask = mask_h[:, None] & mask_d[None, :]
        acc = acc / l_i[:, None]
        if KV_FP8:
            acc = acc * v_scale
        tl.store(
            Acc + b * stride_ab + heads[:, None] * stride_ah + split * stride_as + offs_d[None, :],
            acc, mask=out_mask,
        )
        tl.store(Lse + b * stride_lb + heads * stride_lh + split, m_i + tl.log2(l_i), mask=mask_h)


@triton.jit
def _decode_merge_kernel(
    Acc, Lse, SeqLens, NumSplits, Out,
    stride_ab, stride_ah, stride_as,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    n_splits = tl.load(NumSplits + b)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    # Same boundaries as the split kernel: skip splits it left unwritten.
    valid = (offs_s < n_splits) & (offs_s * seq_len // n_splits < (offs_s + 1) * seq_len // n_splits)
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + offs_s, mask=valid, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    w = tl.where(valid, w, 0.0)
    acc = tl.load(
        Acc + b * stride_ab + h * stride_ah + offs_s[:, None] * stride_as + offs_d[None, :],
        mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )
    out = tl.sum(acc * w[:, None], 0) / tl.sum(w, 0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


@dataclass
class DecodeWorkspace:
    """Scratch for one decode batch; all of it may be views into longer, reused buffers."""

    max_splits: int
    num_splits: torch.Tensor  # [bs] int32, splits per request (<= max_splits)
    acc: torch.Tensor  # [bs, q_heads, max_splits, head_dim] fp32, each split's normalised output
    lse: torch.Tensor  # [bs, q_heads, max_splits] fp32, each split's log2-sum-exp2


def plan_max_splits(max_len: int, bs: int, num_kv_heads: int, num_sms: int,
                    min_split_tokens: int = MIN_SPLIT_TOKENS) -> int:
    """Splits for the grid: as many as the longest request can fill with min_split_tokens each,
    but no more than needed for the (bs x kv_heads x splits) grid to cover WAVES_PER_SM per SM."""
    by_len = triton.cdiv(max(max_len, 1), min_split_tokens)
    by_occupancy = triton.cdiv(WAVES_PER_SM * num_sms, max(bs * num_kv_heads, 1))
    return max(1, min(by_len, by_occupancy, MAX_SPLITS))


def fill_num_splits(out: torch.Tensor, seq_lens: torch.Tensor, max_splits: int,
                    min_split_tokens: int = MIN_SPLIT_TOKENS) -> torch.Tensor:
    """Per-request split counts, on the device and in place (no host sync, fixed address)."""
    n = torch.div(seq_lens + (min_split_tokens - 1), min_split_tokens, rounding_mode="floor")
    out.copy_(n.clamp_(1, max_splits))
    return out


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter: any small number works


def make_workspace(bs: int, num_heads: int, head_dim: int, max_splits: int, seq_lens: torch.Tensor,
                   min_split_tokens: int = MIN_SPLIT_TOKENS) -> DecodeWorkspace:
    dev = seq_lens.device
    num_splits = fill_num_splits(torch.empty(bs, dtype=torch.int32, device=dev), seq_lens, max_splits,
                                 min_split_tokens)
    return DecodeWorkspace(
        max_splits, num_splits,
        torch.empty(bs, num_heads, max_splits, head_dim, dtype=torch.float32, device=dev),
        torch.empty(bs, num_heads, max_splits, dtype=torch.float32, device=dev),
    )


def _block_sizes(head_dim: int, group: int) -> tuple[int, int, int]:
    block_d = triton.next_power_of_2(head_dim)
    block_h = max(16, triton.next_power_of_2(group))  # tl.dot wants M >= 16
    block_n = 64 if block_d <= 128 else 32  # keep the K/V tiles within registers
    return block_h, block_d, block_n


def decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    scaling: float,
    max_len_hint: int | None,
    workspace: DecodeWorkspace | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """q [bs, Hq, D] attends to req_to_token[req_pool_indices[i], :seq_lens[i]] slots of k/v_buf
    [slots, Hk, D]; writes out [bs, Hq, D]. max_len_hint bounds seq_lens (None: the table width)
    and is used only when no workspace is given. float8_e4m3fn buffers hold K / k_scale and
    V / v_scale (the FP8 KV cache)."""
    bs, num_heads, head_dim = q.shape
    num_kv_heads = k_buf.shape[1]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert q.stride(2) == 1 and k_buf.stride(2) == 1 and v_buf.stride(2) == 1 and out.stride(2) == 1
    assert req_to_token.stride(1) == 1
    group = num_heads // num_kv_heads
    if bs == 0:
        return out
    if workspace is None:
        max_len = max_len_hint if max_len_hint is not None else req_to_token.shape[1]
        max_splits = plan_max_splits(max_len, bs, num_kv_heads, num_sms(q.device))
        workspace = make_workspace(bs, num_heads, head_dim, max_splits, seq_lens)
    ws = workspace
    assert ws.acc.stride(3) == 1 and ws.lse.stride(2) == 1 and ws.num_splits.dtype == torch.int32
    block_h, block_d, block_n = _block_sizes(head_dim, group)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 must not round through tf32
    kv_fp8 = k_buf.dtype == torch.float8_e4m3fn
    assert v_buf.dtype == k_buf.dtype

    _decode_split_kernel[(bs, num_kv_heads, ws.max_splits)](
        q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, ws.num_splits, ws.acc, ws.lse,
        scaling * _LOG2E, float(k_scale), float(v_scale),
        q.stride(0), q.stride(1),
        k_buf.stride(0), k_buf.stride(1),
        v_buf.stride(0), v_buf.stride(1),
        req_to_token.stride(0),
        ws.acc.stride(0), ws.acc.stride(1), ws.acc.stride(2),
        ws.lse.stride(0), ws.lse.stride(1),
        GROUP=group, HEAD_DIM=head_dim,
        BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_N=block_n,
        DOT_PRECISION=precision, KV_FP8=kv_fp8,
        num_warps=4, num_stages=2,
    )
    _decode_merge_kernel[(bs, num_heads)](
        ws.acc, ws.lse, seq_lens, ws.num_splits, out,
        ws.acc.stride(0), ws.acc.stride(1), ws.acc.stride(2),
        ws.lse.stride(0), ws.lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(ws.max_splits),
        num_warps=4 if block_d >= 128 else 2,
    )
    return out
