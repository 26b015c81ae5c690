"""The experts of one token (batch-1 decode) as two GEMV kernels, with no sort and no padding.

A single token's top-k experts are distinct, so reading each chosen expert's weights once is the whole
cost of the step, and at one row the grouped GEMM of triton_moe.py wastes most of its work: a BLOCK_M
of 16 rows for one real row, plus the ~15 small align kernels before it (profiled: 37 us a layer on
an H100, more than Qwen3-30B-A3B's two GEMMs together). Here each program owns (one of the k pairs,
BLOCK_N output rows) and walks the input dim like layers/gemv.py does: gate and up rows of w13 with
SiLU-and-mul fused, then w2's rows times the routing weight; a sum over k finishes the token.
Rounding follows the unfused model (each projection, silu(gate), the product, the projection before
the weighting), as in triton_moe.py. The default for one token; RADIXSERVE_MOE_DECODE_GEMV=0 turns it off.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton never call this
    triton = None

# as layers/gemv.py: a program reads BLOCK_N rows x BLOCK_K columns per step
MAX_BLOCK_K = 2048
TILE_ELEMENTS = 4096
NUM_WARPS = 4

if triton is not None:

    @triton.jit
    def _local_expert(ids_ptr, map_ptr, pair, HAS_MAP: tl.constexpr):
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        if HAS_MAP:
            expert = tl.load(map_ptr + expert).to(tl.int64)
        return expert

    @triton.jit
    def _gate_up_gemv_kernel(x_ptr, w_ptr, ids_ptr, map_ptr, act_ptr, n, h, up_offset, w_stride_e, w_stride_n,
                             TOP_K: tl.constexpr, HAS_MAP: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        pair = tl.program_id(1)
        expert = _local_expert(ids_ptr, map_ptr, pair, HAS_MAP)
        if expert < 0:  # another rank's expert: the down kernel writes this pair's zeros
            return
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        # rows past N are clamped rather than masked, so full steps load without masks (gemv.py)
        g_rows = w_ptr + expert * w_stride_e + tl.minimum(rows, n - 1)[:, None].to(tl.int64) * w_stride_n
        u_rows = g_rows + up_offset
        x_row = x_ptr + (pair // TOP_K) * h
        gate = tl.zeros([BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, h, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            if k0 + BLOCK_K <= h:
                x = tl.load(x_row + cols)
                wg = tl.load(g_rows + cols[None, :])
                wu = tl.load(u_rows + cols[None, :])
            else:
                valid = cols < h
                x = tl.load(x_row + cols, mask=valid, other=0.0)
                wg = tl.load(g_rows + cols[None, :], mask=valid[None, :], other=0.0)
                wu = tl.load(u_rows + cols[None, :], mask=valid[None, :], other=0.0)
            xf = x.to(tl.float32)[None, :]
            gate += tl.sum(wg.to(tl.float32) * xf, axis=1)
            up += tl.sum(wu.to(tl.float32) * xf, axis=1)
        dtype = act_ptr.dtype.element_ty
        gate = gate.to(dtype).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        act = (act * up.to(dtype).to(tl.float32)).to(dtype)
        tl.store(act_ptr + pair * n + rows, act, mask=rows < n)

    @triton.jit
    def _down_gemv_kernel(act_ptr, w_ptr, ids_ptr, map_ptr, weights_ptr, out_ptr, h, n, w_stride_e, w_stride_h,
                          HAS_MAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pair = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        expert = _local_expert(ids_ptr, map_ptr, pair, HAS_MAP)
        dtype = out_ptr.dtype.element_ty
        if expert < 0:
            tl.store(out_ptr + pair * h + rows, tl.zeros([BLOCK_N], dtype=dtype), mask=rows < h)
            return
        w_rows = w_ptr + expert * w_stride_e + tl.minimum(rows, h - 1)[:, None].to(tl.int64) * w_stride_h
        a_row = act_ptr + pair * n
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, n, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            if k0 + BLOCK_K <= n:
                a = tl.load(a_row + cols)
                w = tl.load(w_rows + cols[None, :])
            else:
                valid = cols < n
                a = tl.load(a_row + cols, mask=valid, other=0.0)
                w = tl.load(w_rows + cols[None, :], mask=valid[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * a.to(tl.float32)[None, :], axis=1)
        weight = tl.load(weights_ptr + pair).to(tl.float32)
        y = acc.to(dtype).to(tl.float32) * weight
        tl.store(out_ptr + pair * h + rows, y.to(dtype), mask=rows < h)


def _tile(k_in: int) -> tuple[int, int]:
    block_k = min(MAX_BLOCK_K, triton.next_power_of_2(k_in))
    return max(1, TILE_ELEMENTS // block_k), block_k


def moe_decode_one_token(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                         expert_map: Tensor | None = None) -> Tensor:
    """fused_experts_triton for x of one row: [1, H] -> [1, H]."""
    _, h = x.shape
    n = w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    x = x.contiguous()
    ids = topk_ids.reshape(-1)
    weights = topk_weights.reshape(-1).float()
    id_map = expert_map if expert_map is not None else ids  # a placeholder pointer when there is no map
    act = torch.empty((top_k, n), dtype=x.dtype, device=x.device)
    block_n, block_k = _tile(h)
    _gate_up_gemv_kernel[(triton.cdiv(n, block_n), top_k)](
        x, w13, ids, id_map, act, n, h, n * w13.stride(1), w13.stride(0), w13.stride(1),
        TOP_K=top_k, HAS_MAP=expert_map is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=NUM_WARPS,
    )
    out = torch.empty((top_k, h), dtype=x.dtype, device=x.device)
    block_n, block_k = _tile(n)
    _down_gemv_kernel[(triton.cdiv(h, block_n), top_k)](
        act, w2, ids, id_map, weights, out, h, n, w2.stride(0), w2.stride(1),
        HAS_MAP=expert_map is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=NUM_WARPS,
    )
    return out.sum(dim=0, keepdim=True) if top_k > 1 else out
