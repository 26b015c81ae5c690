"""Extend (prefill) attention for DeepSeek's multi-head latent attention (MLA), absorbed form.

The same attention as mla_decode.py, for many new tokens per request: new token i of a request sits at
position prefix + i and attends causally to positions 0..prefix + i. Every key, the new tokens' own
latents included, is read from the pool through the request's req_to_token row (the backend writes the
new latents first), so an fp8 pool's rounding is seen alike in prefill, decode and on a cache hit.

Grid (bs, ceil(H / PACK), ceil(max_extend_len / TOK)): a program's BLOCK_M query rows are TOK
consecutive new tokens x PACK heads (row r: token r // PACK, head r % PACK). All heads share the one
latent "KV head", so each gathered latent tile [BLOCK_N, D] serves the PACK heads and both dots:
[BLOCK_M, D] x [D, BLOCK_N] for the scores and (its first kv_lora_rank columns) [BLOCK_M, BLOCK_N] x
[BLOCK_N, BLOCK_DV] for the output. Key blocks that end before this tile's first token's position
are visible to every row and run unmasked; only the blocks along the diagonal (and a ragged end) are
masked. The head is split into a BLOCK_DV part (kv_lora_rank, padded to a power of two) and a
BLOCK_DPE part (the rope dims), as in decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from radixserve.attention.kernels.mla_decode import check_mla_shapes

_LOG2E = 1.4426950408889634


@triton.jit
def _mla_attend_block(q_nope, q_pe, lat, pe, m_i, l_i, acc, sm_scale_log2, visible, MASKED: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """One online-softmax step over a latent block: returns the updated (m_i, l_i, acc)."""
    lat = lat.to(q_nope.dtype)
    s = tl.dot(q_nope, tl.trans(lat), input_precision=DOT_PRECISION)
    s = tl.dot(q_pe, tl.trans(pe.to(q_pe.dtype)), s, input_precision=DOT_PRECISION)
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * sm_scale_log2)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * sm_scale_log2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(lat.dtype), lat, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _mla_extend_kernel(
    Q, Latent, Out, ReqToToken, ReqPoolIdx, PrefixLens, ExtendLens, ExtendStart,
    sm_scale_log2, latent_scale,
    stride_qt, stride_qh,
    stride_lt,
    stride_ot, stride_oh,
    stride_rt,
    NUM_HEADS: tl.constexpr, KV_LORA_RANK: tl.constexpr, ROPE_DIM: tl.constexpr,
    PACK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_DPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LATENT_FP8: tl.constexpr,
):
    TOK: tl.constexpr = BLOCK_M // PACK
    b = tl.program_id(0)
    h0 = tl.program_id(1) * PACK
    mb = tl.num_programs(2) - 1 - tl.program_id(2)  # the rows with the most keys start first
    if LATENT_FP8:  # stored L = real L / scale: scale the scores instead of every key
        sm_scale_log2 = sm_scale_log2 * latent_scale

    ext_len = tl.load(ExtendLens + b).to(tl.int32)
    if mb * TOK < ext_len:
        prefix = tl.load(PrefixLens + b).to(tl.int32)
        q_start = tl.load(ExtendStart + b).to(tl.int64)

        offs_r = tl.arange(0, BLOCK_M)
        offs_m = mb * TOK + offs_r // PACK  # each row's token, within the request's new tokens
        heads = h0 + offs_r % PACK
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_dpe = tl.arange(0, BLOCK_DPE)
        offs_bn = tl.arange(0, BLOCK_N)
        mask_m = (offs_m < ext_len) & (heads < NUM_HEADS)
        mask_dv = offs_dv < KV_LORA_RANK
        mask_dpe = offs_dpe < ROPE_DIM

        q_rows = Q + ((q_start + offs_m) * stride_qt + heads * stride_qh)[:, None]
        q_nope = tl.load(q_rows + offs_dv[None, :], mask=mask_m[:, None] & mask_dv[None, :], other=0.0)
        q_pe = tl.load(q_rows + KV_LORA_RANK + offs_dpe[None, :], mask=mask_m[:, None] & mask_dpe[None, :],
                       other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        slot_row = ReqToToken + tl.load(ReqPoolIdx + b).to(tl.int64) * stride_rt

        # Keys before this tile's first query position are visible to every row: whole blocks unmasked.
        full_end = (prefix + mb * TOK) // BLOCK_N * BLOCK_N
        for n0 in range(0, full_end, BLOCK_N):
            rows = Latent + tl.load(slot_row + n0 + offs_bn).to(tl.int64)[:, None] * stride_lt
            lat = tl.load(rows + offs_dv[None, :], mask=mask_dv[None, :], other=0.0)
            pe = tl.load(rows + KV_LORA_RANK + offs_dpe[None, :], mask=mask_dpe[None, :], other=0.0)
            m_i, l_i, acc = _mla_attend_block(q_nope, q_pe, lat, pe, m_i, l_i, acc, sm_scale_log2, None, False,
                                              DOT_PRECISION)
        # Along the diagonal: key position j is visible to the row of new token i when j <= prefix + i.
        # Key 0 is visible to every row, so no row is left at -inf when it is divided.
        kv_end = prefix + tl.minimum(ext_len, (mb + 1) * TOK)
        for n0 in range(full_end, kv_end, BLOCK_N):
            offs_n = n0 + offs_bn
            mask_n = offs_n < kv_end
            rows = Latent + tl.load(slot_row + offs_n, mask=mask_n, other=0).to(tl.int64)[:, None] * stride_lt
            lat = tl.load(rows + offs_dv[None, :], mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
            pe = tl.load(rows + KV_LORA_RANK + offs_dpe[None, :], mask=mask_n[:, None] & mask_dpe[None, :],
                         other=0.0)
            visible = mask_n[None, :] & (offs_n[None, :] <= prefix + offs_m[:, None])
            m_i, l_i, acc = _mla_attend_block(q_nope, q_pe, lat, pe, m_i, l_i, acc, sm_scale_log2, visible, True,
                                              DOT_PRECISION)

        out = acc / l_i[:, None]
        if LATENT_FP8:
            out = out * latent_scale
        o_rows = Out + ((q_start + offs_m) * stride_ot + heads * stride_oh)[:, None]
        tl.store(o_rows + offs_dv[None, :], out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_dv[None, :])


@dataclass(frozen=True)
class MLAExtendConfig:
    """Tile and launch options: BLOCK_M query rows (= BLOCK_M // pack tokens x pack heads), BLOCK_N keys.
    The q tile and the fp32 accumulator [BLOCK_M, BLOCK_DV] live in registers."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    pack: int = 1  # heads per tile (a power of two; capped at the next power of two of H)


def mla_extend_config(kv_lora_rank: int, num_heads: int, dtype: torch.dtype) -> MLAExtendConfig:
    """Defaults not yet timed on a GPU (docs/gpu.md): short tiles for the 512-wide latent (compiled for
    sm_90: 159-251 registers a thread, no spills, for bf16, e4m3 and fp32), 4 heads a tile (each latent
    block then serves 4 heads, and the causal diagonal is 4 times shorter)."""
    if triton.next_power_of_2(kv_lora_rank) >= 256:
        cfg = MLAExtendConfig(block_m=32, block_n=32, num_warps=8, num_stages=1, pack=4)
    else:
        cfg = MLAExtendConfig(block_m=64, block_n=32, num_warps=4, num_stages=2, pack=4)
    if dtype.itemsize > 2:  # fp32: half the rows, so the tiles fit
        cfg = MLAExtendConfig(cfg.block_m // 2, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.pack)
    return cfg


def mla_extend(
    q: torch.Tensor,
    latent_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_start_loc: torch.Tensor,
    out: torch.Tensor,
    scaling: float,
    kv_lora_rank: int,
    max_extend_len: int,
    latent_scale: float = 1.0,
    config: MLAExtendConfig | None = None,
) -> torch.Tensor:
    """q [T, H, D] (D = kv_lora_rank + rope_dim): request i's new tokens are rows
    extend_start_loc[i] : + extend_lens[i], at positions prefix_lens[i] + j. Every key, new ones
    included, is read from latent_buffer [slots, 1, D] at req_to_token[req_pool_indices[i], :position + 1],
    so the new latents must already be there. Writes out [T, H, kv_lora_rank] (in out's dtype).
    A float8_e4m3fn buffer holds L / latent_scale."""
    check_mla_shapes(q, latent_buffer, out, kv_lora_rank)
    num_tokens, num_heads, head_dim = q.shape
    if req_to_token.stride(1) != 1:
        raise ValueError("req_to_token needs a contiguous last dimension")
    bs = req_pool_indices.shape[0]
    if bs == 0 or num_tokens == 0 or max_extend_len <= 0:
        return out
    cfg = config or mla_extend_config(kv_lora_rank, num_heads, q.dtype)
    if cfg.block_m < 16 or cfg.pack < 1 or cfg.pack & (cfg.pack - 1) or cfg.block_m % cfg.pack:
        raise ValueError(f"block_m {cfg.block_m} must be >= 16 and a multiple of pack {cfg.pack} (a power of two)")
    pack = min(cfg.pack, triton.next_power_of_2(num_heads))  # no tile of only padding heads
    rope_dim = head_dim - kv_lora_rank
    grid = (bs, triton.cdiv(num_heads, pack), triton.cdiv(max_extend_len, cfg.block_m // pack))
    _mla_extend_kernel[grid](
        q, latent_buffer, out, req_to_token, req_pool_indices, prefix_lens, extend_lens, extend_start_loc,
        scaling * _LOG2E, float(latent_scale),
        q.stride(0), q.stride(1),
        latent_buffer.stride(0),
        out.stride(0), out.stride(1),
        req_to_token.stride(0),
        NUM_HEADS=num_heads, KV_LORA_RANK=kv_lora_rank, ROPE_DIM=rope_dim,
        PACK=pack, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_DV=triton.next_power_of_2(kv_lora_rank), BLOCK_DPE=max(16, triton.next_power_of_2(rope_dim)),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 must not round through tf32
        LATENT_FP8=latent_buffer.dtype == torch.float8_e4m3fn,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
