"""Split-KV decode for DeepSeek's multi-head latent attention (MLA), absorbed form.

Every token of a layer caches one latent row L [D] (D = kv_lora_rank + rope_dim: the normed compressed
kv, then the rotated k_pe); all query heads attend to it, with the latent's first kv_lora_rank columns
as the value (docs/gpu.md, "MLA kernels"):

    s[h, j] = scaling * q[h, :D] . L[j, :D],    out[h] = sum_j softmax_j(s[h]) * L[j, :kv_lora_rank]

Stage 1, grid (bs, ceil(H / BLOCK_H), max_splits): one program takes one request, BLOCK_H of its heads
and one contiguous slice (split) of its context. The head is split in two column blocks, BLOCK_DV
(kv_lora_rank, padded to a power of two) and BLOCK_DPE (the rope part), so neither needs D to be a
power of two. Each latent tile [BLOCK_N, D] is gathered once through req_to_token and used twice: as
the keys of [BLOCK_H, D] x [D, BLOCK_N] and (its first kv_lora_rank columns) as the values of
[BLOCK_H, BLOCK_N] x [BLOCK_N, BLOCK_DV]. The program writes its normalised partial output and its
log-sum-exp (base 2) to the same fp32 workspace decode_attention.py uses.

Stage 2, grid (bs, H): merges the splits of one (request, head), walking them one at a time (the
partial outputs are kv_lora_rank wide, too wide to hold all splits at once).

A float8_e4m3fn latent buffer holds L / latent_scale: tiles are upcast to q's dtype (exact), the scale
multiplies the scores (folded into the softmax scale) and the split's output.

How many splits: with many heads a split's workspace output (H x (kv_lora_rank + 1) fp32) rivals the
latent it reads, so a split gets at least 2 * H tokens (`mla_min_split_tokens`); the grid's split count
is then planned like decode_attention.py's, counting head blocks as the parallel units per request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from radixserve.attention.kernels.decode_attention import (
    MIN_SPLIT_TOKENS,
    DecodeWorkspace,
    make_workspace,
    num_sms,
    plan_max_splits,
)

_LOG2E = 1.4426950408889634


@triton.jit
def _mla_decode_split_kernel(
    Q, Latent, ReqToToken, ReqPoolIdx, SeqLens, NumSplits, Acc, Lse,
    sm_scale_log2, latent_scale,
    stride_qb, stride_qh,
    stride_lt,
    stride_rt,
    stride_ab, stride_ah, stride_as,
    stride_lb, stride_lh,
    NUM_HEADS: tl.constexpr, KV_LORA_RANK: tl.constexpr, ROPE_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DPE: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LATENT_FP8: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # int64: b * stride_ab passes 2^31 at a few hundred requests
    hb = tl.program_id(1)
    split = tl.program_id(2)
    if LATENT_FP8:  # stored L = real L / scale: scale the scores instead of every key
        sm_scale_log2 = sm_scale_log2 * latent_scale

    seq_len = tl.load(SeqLens + b).to(tl.int32)
    n_splits = tl.load(NumSplits + b)
    # Balanced boundaries (as decode_attention.py, whose merge rule stage 2 repeats).
    start = split * seq_len // n_splits
    end = (split + 1) * seq_len // n_splits
    if (split < n_splits) & (start < end):
        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_dpe = tl.arange(0, BLOCK_DPE)
        mask_h = heads < NUM_HEADS
        mask_dv = offs_dv < KV_LORA_RANK
        mask_dpe = offs_dpe < ROPE_DIM

        q_rows = Q + b * stride_qb + heads[:, None] * stride_qh
        q_nope = tl.load(q_rows + offs_dv[None, :], mask=mask_h[:, None] & mask_dv[None, :], other=0.0)
        q_pe = tl.load(q_rows + KV_LORA_RANK + offs_dpe[None, :], mask=mask_h[:, None] & mask_dpe[None, :],
                       other=0.0)
        slot_row = ReqToToken + tl.load(ReqPoolIdx + b).to(tl.int64) * stride_rt

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            rows = Latent + tl.load(slot_row + offs_n, mask=mask_n, other=0).to(tl.int64)[:, None] * stride_lt
            lat = tl.load(rows + offs_dv[None, :], mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
            lat = lat.to(q_nope.dtype)
            pe = tl.load(rows + KV_LORA_RANK + offs_dpe[None, :], mask=mask_n[:, None] & mask_dpe[None, :],
                         other=0.0)
            s = tl.dot(q_nope, tl.trans(lat), input_precision=DOT_PRECISION)
            s = tl.dot(q_pe, tl.trans(pe.to(q_pe.dtype)), s, input_precision=DOT_PRECISION)
            s = tl.where(mask_n[None, :], s * sm_scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(lat.dtype), lat, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new

        acc = acc / l_i[:, None]
        if LATENT_FP8:
            acc = acc * latent_scale
        tl.store(
            Acc + b * stride_ab + heads[:, None] * stride_ah + split * stride_as + offs_dv[None, :],
            acc, mask=mask_h[:, None] & mask_dv[None, :],
        )
        tl.store(Lse + b * stride_lb + heads * stride_lh + split, m_i + tl.log2(l_i), mask=mask_h)


@triton.jit
def _mla_decode_merge_kernel(
    Acc, Lse, SeqLens, NumSplits, Out,
    stride_ab, stride_ah, stride_as,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    KV_LORA_RANK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    n_splits = tl.load(NumSplits + b)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < KV_LORA_RANK
    # Same boundaries as the split kernel: skip the splits it left unwritten.
    valid = (offs_s < n_splits) & (offs_s * seq_len // n_splits < (offs_s + 1) * seq_len // n_splits)
    lse_row = Lse + b * stride_lb + h * stride_lh
    lse = tl.load(lse_row + offs_s, mask=valid, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    denom = tl.sum(tl.where(valid, tl.exp2(lse - lse_max), 0.0), 0)
    acc_row = Acc + b * stride_ab + h * stride_ah
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s in range(0, n_splits):
        written = s * seq_len // n_splits < (s + 1) * seq_len // n_splits
        w = tl.where(written, tl.exp2(tl.load(lse_row + s) - lse_max), 0.0)  # (in bounds: s < n_splits)
        part = tl.load(acc_row + s * stride_as + offs_dv, mask=mask_dv, other=0.0)
        acc += tl.where(written, w * part, 0.0)  # an unwritten split's stale values never count
    tl.store(Out + b * stride_ob + h * stride_oh + offs_dv, (acc / denom).to(Out.dtype.element_ty), mask=mask_dv)


@dataclass(frozen=True)
class MLADecodeConfig:
    """Tile and launch options. The accumulator [BLOCK_H, BLOCK_DV] fp32 lives in registers and the
    latent tile [BLOCK_N, BLOCK_DV] is reused by both dots, so wide latents get shorter key blocks."""

    block_h: int = 16  # heads per program; tl.dot wants M >= 16, so fewer heads are padded
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 2


def mla_decode_config(kv_lora_rank: int) -> MLADecodeConfig:
    """Defaults not yet timed on a GPU (docs/gpu.md). At kv_lora_rank 512, 32 keys a block and 8 warps:
    compiled for sm_90 this needs 149-234 registers a thread and spills nothing for a bf16, e4m3 or fp32
    latent, where 4 warps spill (e4m3, fp32). Narrow latents take 64 keys a block."""
    if triton.next_power_of_2(kv_lora_rank) >= 256:
        return MLADecodeConfig(block_n=32, num_warps=8)
    return MLADecodeConfig(block_n=64, num_warps=4)


def mla_min_split_tokens(num_heads: int, min_split_tokens: int = MIN_SPLIT_TOKENS) -> int:
    """Tokens a split needs at least. A split writes num_heads * (kv_lora_rank + 1) fp32 values to the
    workspace and reads tokens * (kv_lora_rank + rope) bf16 latent values, so at 2 * num_heads tokens
    the two are about equal; shorter splits would move more workspace bytes than cache bytes."""
    return max(min_split_tokens, 2 * num_heads)


def plan_mla_splits(max_len: int, bs: int, num_heads: int, num_sms_: int,
                    min_split_tokens: int = MIN_SPLIT_TOKENS, block_h: int = 16) -> tuple[int, int]:
    """(max_splits for the grid, min tokens per split for fill_num_splits): decode_attention's plan
    with the head blocks of a request as its parallel units and the MLA split floor."""
    min_split = mla_min_split_tokens(num_heads, min_split_tokens)
    head_blocks = triton.cdiv(max(num_heads, 1), block_h)
    return plan_max_splits(max_len, bs, head_blocks, num_sms_, min_split), min_split


def check_mla_shapes(q: torch.Tensor, latent_buffer: torch.Tensor, out: torch.Tensor, kv_lora_rank: int) -> None:
    """q [T, H, D], latent_buffer [S, 1, D], out [T, H, kv_lora_rank], 0 < kv_lora_rank < D."""
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, heads, kv_lora_rank + rope_dim], got shape {tuple(q.shape)}")
    t, h, d = q.shape
    if not 0 < kv_lora_rank < d:
        raise ValueError(f"kv_lora_rank {kv_lora_rank} must lie in (0, {d}): q's width {d} = kv_lora_rank + rope_dim")
    if latent_buffer.dim() != 3 or latent_buffer.shape[1:] != (1, d):
        raise ValueError(f"latent_buffer must be [slots, 1, {d}], got shape {tuple(latent_buffer.shape)}")
    if tuple(out.shape) != (t, h, kv_lora_rank):
        raise ValueError(f"out must be [{t}, {h}, {kv_lora_rank}], got shape {tuple(out.shape)}")
    if q.stride(2) != 1 or latent_buffer.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError("q, latent_buffer and out need a contiguous last dimension")


def mla_decode(
    q: torch.Tensor,
    latent_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    scaling: float,
    kv_lora_rank: int,
    max_len_hint: int | None = None,
    workspace: DecodeWorkspace | None = None,
    latent_scale: float = 1.0,
    config: MLADecodeConfig | None = None,
) -> torch.Tensor:
    """q [bs, H, D] (D = kv_lora_rank + rope_dim) attends to the latents at
    req_to_token[req_pool_indices[i], :seq_lens[i]] of latent_buffer [slots, 1, D]; writes out
    [bs, H, kv_lora_rank] (in out's dtype). A float8_e4m3fn buffer holds L / latent_scale.

    workspace: acc [bs, H, max_splits, kv_lora_rank] and its num_splits filled with the same
    min_split_tokens the plan used (the backend's, for CUDA graphs); None plans one here from
    max_len_hint (None: the table width)."""
    check_mla_shapes(q, latent_buffer, out, kv_lora_rank)
    bs, num_heads, head_dim = q.shape
    if req_to_token.stride(1) != 1:
        raise ValueError("req_to_token needs a contiguous last dimension")
    if bs == 0:
        return out
    cfg = config or mla_decode_config(kv_lora_rank)
    if workspace is None:
        max_len = max_len_hint if max_len_hint is not None else req_to_token.shape[1]
        max_splits, min_split = plan_mla_splits(max_len, bs, num_heads, num_sms(q.device), block_h=cfg.block_h)
        workspace = make_workspace(bs, num_heads, kv_lora_rank, max_splits, seq_lens, min_split)
    ws = workspace
    if ws.acc.shape != (bs, num_heads, ws.max_splits, kv_lora_rank) or ws.acc.stride(3) != 1:
        raise ValueError(f"workspace acc must be [{bs}, {num_heads}, {ws.max_splits}, {kv_lora_rank}], "
                         f"got shape {tuple(ws.acc.shape)}")
    assert ws.lse.stride(2) == 1 and ws.num_splits.dtype == torch.int32
    rope_dim = head_dim - kv_lora_rank
    block_dv = triton.next_power_of_2(kv_lora_rank)
    block_h = max(16, cfg.block_h)  # tl.dot wants M >= 16
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 must not round through tf32

    _mla_decode_split_kernel[(bs, triton.cdiv(num_heads, block_h), ws.max_splits)](
        q, latent_buffer, req_to_token, req_pool_indices, seq_lens, ws.num_splits, ws.acc, ws.lse,
        scaling * _LOG2E, float(latent_scale),
        q.stride(0), q.stride(1),
        latent_buffer.stride(0),
        req_to_token.stride(0),
        ws.acc.stride(0), ws.acc.stride(1), ws.acc.stride(2),
        ws.lse.stride(0), ws.lse.stride(1),
        NUM_HEADS=num_heads, KV_LORA_RANK=kv_lora_rank, ROPE_DIM=rope_dim,
        BLOCK_H=block_h, BLOCK_DV=block_dv, BLOCK_DPE=max(16, triton.next_power_of_2(rope_dim)),
        BLOCK_N=cfg.block_n, DOT_PRECISION=precision, LATENT_FP8=latent_buffer.dtype == torch.float8_e4m3fn,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _mla_decode_merge_kernel[(bs, num_heads)](
        ws.acc, ws.lse, seq_lens, ws.num_splits, out,
        ws.acc.stride(0), ws.acc.stride(1), ws.acc.stride(2),
        ws.lse.stride(0), ws.lse.stride(1),
        out.stride(0), out.stride(1),
        KV_LORA_RANK=kv_lora_rank, BLOCK_DV=block_dv, BLOCK_S=triton.next_power_of_2(ws.max_splits),
        num_warps=4 if block_dv >= 256 else 2,
    )
    return out
