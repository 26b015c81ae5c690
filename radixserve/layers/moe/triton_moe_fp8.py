"""FP8 experts in Triton: triton_moe.py's grouped GEMMs over e4m3 weights with block factors.

The same plan as the bf16 kernel (align by expert, gate/up with SiLU-and-mul, down times the routing
weight, a sum over the k slots), with w8a8 numerics as fp8_kernels.py's dense GEMM has them:
1. x [T, H] is quantised per token and group of bk columns (fp8_kernels.per_token_group_quant_fp8),
   once per token, whichever experts read it.
2. Gate/up: BLOCK_K is the group bk, so each K step is one fp8 x fp8 tl.dot with an fp32 result,
   scaled by x's group factor times the weight block's factor and added to an fp32 accumulator. The
   epilogue rounds as the bf16 kernel does (each projection, silu(gate), the product, to x's dtype)
   and then quantises the activation for the down GEMM in place: BLOCK_N is the group bk, so a
   program's tile holds whole groups of its rows; it stores e4m3 values and one factor per (row,
   group), the activation never reaching memory in x's dtype.
3. Down: the same block-scaled loop over N, times the routing weight.
w13's factors hold the gate half's block rows and then the up half's (layer.py), so gate column c reads
factor row c // bn and up column c reads half + c // bn. Tiles: tile_configs.py under dtype
float8_e4m3fn (BLOCK_M, the down GEMM's BLOCK_N, GROUP_M, warps, stages; BLOCK_K and the gate/up
BLOCK_N are the group). Untimed on a GPU so far (docs/fp8.md "FP8 experts").
"""

from __future__ import annotations

import torch
from torch import Tensor

from radixserve.layers.moe import triton_moe
from radixserve.layers.moe.tile_configs import tile_config
from radixserve.layers.quantization.fp8_kernels import (
    _interpreting,
    _to_fp8,
    per_token_group_quant_fp8,
    takes_fp8_kernels,
)
from radixserve.layers.quantization.fp8_utils import EPS, FP8_DTYPE, FP8_MAX

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton use torch_moe.py
    triton = None

TILE_DTYPE = "float8_e4m3fn"  # the tile tables' dtype key for FP8 experts

if triton is not None:
    _EPS = tl.constexpr(EPS)
    _INV_MAX = tl.constexpr(1.0 / FP8_MAX)
    _tile_of = triton_moe._tile_of
    _expert_of = triton_moe._expert_of

    @triton.jit
    def _fp8_gate_up_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, aq_ptr, as_ptr, sorted_ptr, padded_end_ptr,
                            num_experts, num_pairs, n, h, num_m, up_offset, up_scale_offset,
                            x_stride, xs_stride, w_stride_e, w_stride_n, ws_stride_e, ws_stride_n,
                            aq_stride, as_stride, TOP_K: tl.constexpr, EXPERTS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_N: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                            OUT_DTYPE: tl.constexpr, EXACT_CAST: tl.constexpr):
        pid_m, pid_n = _tile_of(tl.program_id(0), num_m, tl.cdiv(n, BLOCK_N), GROUP_M)
        expert, active = _expert_of(padded_end_ptr, num_experts, pid_m, BLOCK_M, EXPERTS)
        if not active:
            return
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(sorted_ptr + rows)
        row_valid = pairs < num_pairs
        tokens = (pairs // TOP_K).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_cols = tl.minimum(cols, n - 1).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = xq_ptr + tokens[:, None] * x_stride + ks[None, :]
        as_ptrs = xs_ptr + tokens * xs_stride
        g_ptrs = w_ptr + expert * w_stride_e + w_cols[None, :] * w_stride_n + ks[:, None]
        u_ptrs = g_ptrs + up_offset
        gs_ptrs = ws_ptr + expert * ws_stride_e + (w_cols // GROUP_N) * ws_stride_n
        us_ptrs = gs_ptrs + up_scale_offset
        gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(0, tl.cdiv(h, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_valid[:, None], other=0.0)
                wg = tl.load(g_ptrs)
                wu = tl.load(u_ptrs)
            else:  # zeros past H add nothing
                k_valid = ks < h - kb * BLOCK_K
                a = tl.load(a_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
                wg = tl.load(g_ptrs, mask=k_valid[:, None], other=0.0)
                wu = tl.load(u_ptrs, mask=k_valid[:, None], other=0.0)
            a_s = tl.load(as_ptrs + kb, mask=row_valid, other=0.0)[:, None]
            gate += tl.dot(a, wg) * (a_s * tl.load(gs_ptrs + kb)[None, :])
            up += tl.dot(a, wu) * (a_s * tl.load(us_ptrs + kb)[None, :])
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        # round where the unfused path does: each projection, silu(gate), then the product
        gate = gate.to(OUT_DTYPE).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(OUT_DTYPE).to(tl.float32)
        act = (act * up.to(OUT_DTYPE).to(tl.float32)).to(OUT_DTYPE).to(tl.float32)
        # the down GEMM's input, quantised per (row, group): this tile is one group of its rows.
        # Clamped columns past N repeat column N - 1: zero them so they leave the amax alone.
        col_valid = cols < n
        act = tl.where(col_valid[None, :], act, 0.0)
        scale = tl.maximum(tl.max(tl.abs(act), axis=1), _EPS) * _INV_MAX
        q = _to_fp8(tl.math.div_rn(act, scale[:, None]), EXACT_CAST)
        # padding rows store zeros with the floor factor: the down GEMM reads them harmlessly
        rows64 = rows.to(tl.int64)
        tl.store(aq_ptr + rows64[:, None] * aq_stride + cols[None, :], q, mask=col_valid[None, :])
        tl.store(as_ptr + rows64 * as_stride + pid_n, scale)

    @triton.jit
    def _fp8_down_kernel(aq_ptr, as_ptr, w_ptr, ws_ptr, out_ptr, topk_w_ptr, sorted_ptr, padded_end_ptr,
                         num_experts, num_pairs, h, n, num_m, aq_stride, as_stride, w_stride_e, w_stride_h,
                         ws_stride_e, ws_stride_h, out_stride, EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
                         GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
        pid_m, pid_n = _tile_of(tl.program_id(0), num_m, tl.cdiv(h, BLOCK_N), GROUP_M)
        expert, active = _expert_of(padded_end_ptr, num_experts, pid_m, BLOCK_M, EXPERTS)
        if not active:
            return
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(sorted_ptr + rows)
        row_valid = pairs < num_pairs
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_cols = tl.minimum(cols, h - 1).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        rows64 = rows.to(tl.int64)
        a_ptrs = aq_ptr + rows64[:, None] * aq_stride + ks[None, :]
        as_ptrs = as_ptr + rows64 * as_stride
        b_ptrs = w_ptr + expert * w_stride_e + w_cols[None, :] * w_stride_h + ks[:, None]
        bs_ptrs = ws_ptr + expert * ws_stride_e + (w_cols // GROUP_N) * ws_stride_h
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(0, tl.cdiv(n, BLOCK_K)):
            if EVEN_K:  # every row of the activation exists (padding rows are zeros)
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_valid = ks < n - kb * BLOCK_K
                a = tl.load(a_ptrs, mask=k_valid[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_valid[:, None], other=0.0)
            acc += tl.dot(a, b) * (tl.load(as_ptrs + kb)[:, None] * tl.load(bs_ptrs + kb)[None, :])
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        dtype = out_ptr.dtype.element_ty
        weight = tl.load(topk_w_ptr + pairs, mask=row_valid, other=0.0).to(tl.float32)
        y = acc.to(dtype).to(tl.float32) * weight[:, None]
        tl.store(out_ptr + pairs[:, None].to(tl.int64) * out_stride + cols[None, :], y.to(dtype),
                 mask=row_valid[:, None] & (cols[None, :] < h))


_TL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fused_moe_fp8_launch(x: Tensor, w13: Tensor, w13_scale_inv: Tensor, w2: Tensor, w2_scale_inv: Tensor,
                         topk_weights: Tensor, topk_ids: Tensor, expert_map: Tensor | None = None,
                         block: tuple[int, int] = (128, 128), config: dict | None = None) -> Tensor:
    """fused_experts_fp8_triton's launch; `config` overrides the tile (scripts/gpu_moe_fp8_bench.py)."""
    if triton is None:
        raise RuntimeError("fused_experts_fp8_triton needs Triton")
    num_tokens, h = x.shape
    num_experts, two_n, _ = w13.shape
    n = two_n // 2
    bn, bk = block
    top_k = topk_ids.shape[1]
    assert w13.shape == (num_experts, 2 * n, h) and w2.shape == (num_experts, h, n), (x.shape, w13.shape, w2.shape)
    assert w13.dtype == w2.dtype == FP8_DTYPE and w13.stride(2) == 1 and w2.stride(2) == 1
    assert w13_scale_inv.shape == (num_experts, 2 * _cdiv(n, bn), _cdiv(h, bk)), (w13_scale_inv.shape, block)
    assert w2_scale_inv.shape == (num_experts, _cdiv(h, bn), _cdiv(n, bk)), (w2_scale_inv.shape, block)
    assert bk >= 16 and bk & (bk - 1) == 0, f"the K block {bk} must be a power of two of at least 16"
    assert topk_weights.shape == topk_ids.shape == (num_tokens, top_k), (topk_weights.shape, topk_ids.shape)
    if num_tokens == 0:
        return x.new_empty((0, h))
    cfg = config or tile_config(num_tokens, num_experts, n, h, TILE_DTYPE, triton_moe._device_name(x.device))
    block_m, group_m = cfg["BLOCK_M"], cfg["GROUP_M"]
    warps, stages = cfg["num_warps"], cfg["num_stages"]
    w13_scale_inv, w2_scale_inv = w13_scale_inv.float().contiguous(), w2_scale_inv.float().contiguous()

    ids = topk_ids.reshape(-1).long()
    if expert_map is not None:
        ids = expert_map.index_select(0, ids).long()
    num_pairs = ids.numel()
    sorted_ids, padded_end = triton_moe.align_by_expert(ids, num_experts, block_m)
    bound = sorted_ids.numel()
    num_m = bound // block_m
    experts_p2 = triton.next_power_of_2(num_experts)

    x_q, x_s = per_token_group_quant_fp8(x, bk)
    act_q = torch.empty((bound, n), dtype=FP8_DTYPE, device=x.device)
    act_s = torch.empty((bound, _cdiv(n, bk)), dtype=torch.float32, device=x.device)
    triton_moe._run(
        _fp8_gate_up_kernel, (num_m * triton.cdiv(n, bk),),
        (x_q, x_s, w13, w13_scale_inv, act_q, act_s, sorted_ids, padded_end, num_experts, num_pairs, n, h,
         num_m, n * w13.stride(1), (w13_scale_inv.shape[1] // 2) * w13_scale_inv.stride(1), x_q.stride(0),
         x_s.stride(0), w13.stride(0), w13.stride(1), w13_scale_inv.stride(0), w13_scale_inv.stride(1),
         act_q.stride(0), act_s.stride(0)),
        dict(TOP_K=top_k, EXPERTS=experts_p2, BLOCK_M=block_m, BLOCK_N=bk, BLOCK_K=bk, GROUP_N=bn,
             GROUP_M=group_m, EVEN_K=h % bk == 0, OUT_DTYPE=getattr(tl, _TL_DTYPES[x.dtype]),
             EXACT_CAST=_interpreting()),
        warps, stages)
    # a remote pair's row is never written: zero it rather than sum uninitialised memory (NaN * 0)
    alloc = torch.empty if expert_map is None else torch.zeros
    out = alloc((num_pairs, h), dtype=x.dtype, device=x.device)
    block_n = triton_moe._block(cfg["BLOCK_N"], h)
    triton_moe._run(
        _fp8_down_kernel, (num_m * triton.cdiv(h, block_n),),
        (act_q, act_s, w2, w2_scale_inv, out, topk_weights.reshape(-1).float(), sorted_ids, padded_end,
         num_experts, num_pairs, h, n, num_m, act_q.stride(0), act_s.stride(0), w2.stride(0), w2.stride(1),
         w2_scale_inv.stride(0), w2_scale_inv.stride(1), out.stride(0)),
        dict(EXPERTS=experts_p2, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=bk, GROUP_N=bn, GROUP_M=group_m,
             EVEN_K=n % bk == 0),
        warps, stages)
    if top_k == 1:
        return out
    return out.view(num_tokens, top_k, h).sum(dim=1)


def fused_experts_fp8_triton(x: Tensor, w13: Tensor, w13_scale_inv: Tensor, w2: Tensor, w2_scale_inv: Tensor,
                             topk_weights: Tensor, topk_ids: Tensor, expert_map: Tensor | None = None,
                             block: tuple[int, int] = (128, 128)) -> Tensor:
    """torch_moe.fused_experts_fp8_torch on the GPU: e4m3 w13 [E, 2N, H] / w2 [E, H, N] with block
    factors (layer.py's layout), x [T, H] in bf16/fp16/fp32 -> [T, H] in x's dtype."""
    if torch.compiler.is_compiling():  # one opaque node in the traced graph
        return _fused_moe_fp8_op(x, w13, w13_scale_inv, w2, w2_scale_inv, topk_weights, topk_ids, expert_map,
                                 list(block))
    return fused_moe_fp8_launch(x, w13, w13_scale_inv, w2, w2_scale_inv, topk_weights, topk_ids, expert_map,
                                tuple(block))


@torch.library.custom_op("radixserve::fused_moe_fp8", mutates_args=())
def _fused_moe_fp8_op(x: Tensor, w13: Tensor, w13_scale_inv: Tensor, w2: Tensor, w2_scale_inv: Tensor,
                      topk_weights: Tensor, topk_ids: Tensor, expert_map: Tensor | None, block: list[int]) -> Tensor:
    return fused_moe_fp8_launch(x, w13, w13_scale_inv, w2, w2_scale_inv, topk_weights, topk_ids, expert_map,
                                (block[0], block[1]))


@_fused_moe_fp8_op.register_fake
def _fused_moe_fp8_fake(x: Tensor, w13: Tensor, w13_scale_inv: Tensor, w2: Tensor, w2_scale_inv: Tensor,
                        topk_weights: Tensor, topk_ids: Tensor, expert_map: Tensor | None,
                        block: list[int]) -> Tensor:
    return x.new_empty(x.shape)


def takes_fp8_moe(x: Tensor) -> bool:
    """True where the FP8 fused kernel runs: a GPU with fp8 tensor cores (sm_89+), Triton present, x in
    fp16/bf16/fp32, neither RADIXSERVE_TRITON_MOE=0 nor RADIXSERVE_TRITON_FP8=0."""
    return triton_moe.ENABLED and x.dtype in triton_moe.DTYPES and takes_fp8_kernels(x)
