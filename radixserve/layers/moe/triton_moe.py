"""The experts of a MoE layer in three Triton launches: gate/up with SiLU-and-mul, down, and a sum.

1. Align (torch ops on the device): the T*K (token, slot) pairs are sorted by local expert and each
   expert's run is padded to a multiple of BLOCK_M, so every block of BLOCK_M sorted rows belongs to
   one expert. Padding rows hold the sentinel T*K. Nothing is read back to the host and every buffer
   is sized by a bound that depends on shapes alone (T*K + min(E, T*K) * (BLOCK_M - 1) rows), so
   the layer can be captured in a CUDA graph; each program finds its block's expert and the real
   padded count in a device tensor (padded_end), and programs past that count exit.
2. A grouped GEMM over those blocks, x[token] @ w13[e].T: each program owns matching BLOCK_N columns
   of gate (rows n of w13[e]) and up (rows N + n), accumulates both from one load of x and writes
   silu(gate) * up rounded to x's dtype, so the [rows, 2N] projection never reaches memory.
3. A grouped GEMM, act @ w2[e].T, times the routing weight, written to the pair's own row of a
   [T*K, H] buffer; a sum over K gives the output (deterministic: no atomics).

Pairs whose expert lives on another rank (expert_map -1) are sorted behind the last padded block and
never computed; their rows of the [T*K, H] buffer are zeroed up front so they add exactly nothing.
Tiles come from tile_configs.py (JSON per shape and GPU, tuned by scripts/gpu_moe_kernel_bench.py).
Under torch.compile the launch is the custom op radixserve::fused_moe. RADIXSERVE_TRITON_MOE=0 turns
the kernel off (the caller falls back to torch_moe.py).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from radixserve.layers.moe.tile_configs import tile_config
from radixserve.layers.moe.triton_moe_decode import moe_decode_one_token

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:  # CPU installs without Triton use torch_moe.py
    triton = None

ENABLED = os.environ.get("RADIXSERVE_TRITON_MOE", "1") != "0"
# one token: triton_moe_decode.py's GEMVs instead of the sort + grouped GEMM (1.40x faster at batch 1 on
# Qwen3-30B-A3B, H200: docs/benchmarks.md); RADIXSERVE_MOE_DECODE_GEMV=0 keeps the grouped kernel
DECODE_GEMV = os.environ.get("RADIXSERVE_MOE_DECODE_GEMV", "1") != "0"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)

if triton is not None:

    @triton.jit
    def _tile_of(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """(row block, column block) of program pid: GROUP_M row blocks walk the column blocks
        together, so a weight tile one of them reads is still in L2 for the next (prefill, where an
        expert has several row blocks)."""
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        size = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % per_group) % size, (pid % per_group) // size

    @triton.jit
    def _expert_of(padded_end_ptr, num_experts, pid_m, BLOCK_M: tl.constexpr, EXPERTS: tl.constexpr):
        """(row block pid_m's expert: the number of padded runs that end at or before its first row,
        whether the block lies inside the padded count at all)."""
        start = pid_m * BLOCK_M
        e = tl.arange(0, EXPERTS)
        ends = tl.load(padded_end_ptr + e, mask=e < num_experts, other=0)
        expert = tl.sum(((ends <= start) & (e < num_experts)).to(tl.int32), axis=0)
        return expert.to(tl.int64), start < tl.load(padded_end_ptr + num_experts - 1)

    @triton.jit
    def _gate_up_silu_kernel(x_ptr, w_ptr, act_ptr, sorted_ptr, padded_end_ptr, num_experts, num_pairs,
                             n, h, num_m, up_offset, x_stride, w_stride_e, w_stride_n, act_stride,
                             TOP_K: tl.constexpr, EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
        pid_m, pid_n = _tile_of(tl.program_id(0), num_m, tl.cdiv(n, BLOCK_N), GROUP_M)
        expert, active = _expert_of(padded_end_ptr, num_experts, pid_m, BLOCK_M, EXPERTS)
        if not active:  # past the last padded block: nothing to do
            return
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(sorted_ptr + rows)
        row_valid = pairs < num_pairs
        tokens = (pairs // TOP_K).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # columns past N are clamped, not masked, so weight loads need no mask; the store drops them
        w_cols = tl.minimum(cols, n - 1).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tokens[:, None] * x_stride + ks[None, :]
        g_ptrs = w_ptr + expert * w_stride_e + w_cols[None, :] * w_stride_n + ks[:, None]
        u_ptrs = g_ptrs + up_offset
        gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, h, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_valid[:, None], other=0.0)
                wg = tl.load(g_ptrs)
                wu = tl.load(u_ptrs)
            else:
                k_valid = ks < h - k0
                a = tl.load(a_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
                wg = tl.load(g_ptrs, mask=k_valid[:, None], other=0.0)
                wu = tl.load(u_ptrs, mask=k_valid[:, None], other=0.0)
            # "ieee" only matters for fp32 (else tf32); half-precision inputs ignore it
            gate = tl.dot(a, wg, gate, input_precision="ieee")
            up = tl.dot(a, wu, up, input_precision="ieee")
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        dtype = act_ptr.dtype.element_ty
        # round where the unfused path does: each projection, silu(gate), then the product
        gate = gate.to(dtype).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        act = (act * up.to(dtype).to(tl.float32)).to(dtype)
        # padding rows store zeros (their x was masked to 0), which the down GEMM reads harmlessly
        tl.store(act_ptr + rows[:, None].to(tl.int64) * act_stride + cols[None, :], act,
                 mask=cols[None, :] < n)

    @triton.jit
    def _down_kernel(act_ptr, w_ptr, out_ptr, topk_w_ptr, sorted_ptr, padded_end_ptr, num_experts,
                     num_pairs, h, n, num_m, act_stride, w_stride_e, w_stride_h, out_stride,
                     EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
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
        a_ptrs = act_ptr + rows[:, None].to(tl.int64) * act_stride + ks[None, :]
        b_ptrs = w_ptr + expert * w_stride_e + w_cols[None, :] * w_stride_h + ks[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, n, BLOCK_K):
            if EVEN_K:  # every row of act exists (padding rows are zeros): no row mask
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_valid = ks < n - k0
                a = tl.load(a_ptrs, mask=k_valid[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_valid[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision="ieee")
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        dtype = out_ptr.dtype.element_ty
        weight = tl.load(topk_w_ptr + pairs, mask=row_valid, other=0.0).to(tl.float32)
        # the projection rounds to x's dtype first, as F.linear followed by the weighting does
        y = acc.to(dtype).to(tl.float32) * weight[:, None]
        tl.store(out_ptr + pairs[:, None].to(tl.int64) * out_stride + cols[None, :], y.to(dtype),
                 mask=row_valid[:, None] & (cols[None, :] < h))


def padded_bound(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows of the sorted layout, a multiple of block_m: each non-empty expert pads at most
    block_m - 1 rows, and at most min(E, T*K) experts are non-empty."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-rows // block_m) * block_m


def align_by_expert(local_ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor]:
    """local_ids [T*K] (int64; -1: another rank's expert) -> (sorted_ids [bound] int64: the pair index
    of each row, T*K on padding rows; padded_end [E + 1] int64: where each expert's padded run ends,
    [E - 1] being the padded count). Blocks find their expert in padded_end themselves.

    Device ops only, no host sync, about 15 small kernels: a stable sort by expert gives each pair's
    rank, and searching the sorted ids for each expert's first position gives the counts. Remote pairs
    form bucket E, behind every local expert: past the padded count, inside the bound, never read."""
    num_pairs = local_ids.numel()
    device = local_ids.device
    buckets = num_experts + 1
    sorted_bucket, order = torch.sort(local_ids.remainder(buckets), stable=True)  # -1 -> bucket E
    edges = torch.searchsorted(sorted_bucket, torch.arange(buckets + 1, device=device))
    padded = edges.diff().add_(block_m - 1).div_(block_m, rounding_mode="floor").mul_(block_m)
    padded_end = padded.cumsum(0)
    # a pair's row: its place in the sorted order plus the padding of the experts before its own
    shift = padded_end - padded - edges[:-1]
    dest = shift[sorted_bucket].add_(torch.arange(num_pairs, device=device))
    sorted_ids = torch.full((padded_bound(num_pairs, num_experts, block_m),), num_pairs, dtype=torch.int64,
                            device=device)
    return sorted_ids.scatter_(0, dest, order), padded_end


@functools.lru_cache(maxsize=8)
def _device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def _block(limit: int, size: int) -> int:
    """A tile edge no wider than the dimension needs (tl.dot wants at least 16)."""
    return min(limit, max(16, triton.next_power_of_2(size)))


_stages_that_fit: dict[tuple, int] = {}


def _run(kernel, grid: tuple[int], args: tuple, consts: dict, num_warps: int, num_stages: int) -> None:
    """Launch with the tile's pipeline depth, or the deepest that fits the GPU's shared memory: fp32
    needs twice a half-precision tile's, and a table tuned on a bigger GPU may ask for too much. The
    depth that fitted is remembered, so only the first call (a warm-up, before any graph capture)
    compiles the ones that did not."""
    key = (kernel.fn.__name__, args[0].dtype, args[0].device, num_warps, num_stages, *consts.values())
    stages = _stages_that_fit.get(key, num_stages)
    while True:
        try:
            kernel[grid](*args, **consts, num_warps=num_warps, num_stages=stages)
            break
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
    _stages_that_fit[key] = stages


def fused_moe_launch(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                     expert_map: Tensor | None = None, config: dict | None = None) -> Tensor:
    """fused_experts_triton's launch; `config` overrides the tile (scripts/gpu_moe_kernel_bench.py)."""
    if triton is None:
        raise RuntimeError("fused_experts_triton needs Triton")
    num_tokens, h = x.shape
    num_experts, two_n, _ = w13.shape
    n = two_n // 2
    top_k = topk_ids.shape[1]
    assert w13.shape == (num_experts, 2 * n, h) and w2.shape == (num_experts, h, n), (x.shape, w13.shape, w2.shape)
    assert topk_weights.shape == topk_ids.shape == (num_tokens, top_k), (topk_weights.shape, topk_ids.shape)
    assert w13.dtype == w2.dtype == x.dtype and w13.stride(2) == 1 and w2.stride(2) == 1
    if num_tokens == 0:
        return x.new_empty((0, h))
    if num_tokens == 1 and config is None and DECODE_GEMV:
        return moe_decode_one_token(x, w13, w2, topk_weights, topk_ids, expert_map)
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or tile_config(num_tokens, num_experts, n, h, x.dtype, _device_name(x.device))
    block_m, group_m = cfg["BLOCK_M"], cfg["GROUP_M"]
    warps, stages = cfg["num_warps"], cfg["num_stages"]

    ids = topk_ids.reshape(-1).long()
    if expert_map is not None:
        ids = expert_map.index_select(0, ids).long()
    num_pairs = ids.numel()
    sorted_ids, padded_end = align_by_expert(ids, num_experts, block_m)
    bound = sorted_ids.numel()
    num_m = bound // block_m
    experts_p2 = triton.next_power_of_2(num_experts)

    act = torch.empty((bound, n), dtype=x.dtype, device=x.device)
    bn, bk = _block(cfg["BLOCK_N"], n), _block(cfg["BLOCK_K"], h)
    _run(_gate_up_silu_kernel, (num_m * triton.cdiv(n, bn),),
         (x, w13, act, sorted_ids, padded_end, num_experts, num_pairs, n, h, num_m, n * w13.stride(1),
          x.stride(0), w13.stride(0), w13.stride(1), act.stride(0)),
         dict(TOP_K=top_k, EXPERTS=experts_p2, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m,
              EVEN_K=h % bk == 0), warps, stages)
    # a remote pair's row is never written: zero it rather than sum uninitialised memory (NaN * 0)
    alloc = torch.empty if expert_map is None else torch.zeros
    out = alloc((num_pairs, h), dtype=x.dtype, device=x.device)
    bn, bk = _block(cfg["BLOCK_N"], h), _block(cfg["BLOCK_K"], n)
    _run(_down_kernel, (num_m * triton.cdiv(h, bn),),
         (act, w2, out, topk_weights.reshape(-1).float(), sorted_ids, padded_end, num_experts, num_pairs,
          h, n, num_m, act.stride(0), w2.stride(0), w2.stride(1), out.stride(0)),
         dict(EXPERTS=experts_p2, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m,
              EVEN_K=n % bk == 0), warps, stages)
    if top_k == 1:
        return out
    return out.view(num_tokens, top_k, h).sum(dim=1)  # half-precision sums accumulate in fp32


def fused_experts_triton(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                         expert_map: Tensor | None = None) -> Tensor:
    """out[t] = sum_k topk_weights[t,k] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = the local expert
    of topk_ids[t,k]; x [T, H], w13 [E, 2N, H] (gate rows, then up rows), w2 [E, H, N], topk_* [T, K]
    with global ids, expert_map [E_global] int32 -> local index or -1 (adds nothing). In x's dtype."""
    if torch.compiler.is_compiling():  # one opaque node in the traced graph
        return _fused_moe_op(x, w13, w2, topk_weights, topk_ids, expert_map)
    return fused_moe_launch(x, w13, w2, topk_weights, topk_ids, expert_map)


# The launch as a custom op for torch.compile: Dynamo would otherwise trace into the align step's
# torch ops and the Triton launches. Eager calls skip the op's dispatch (host time).
@torch.library.custom_op("radixserve::fused_moe", mutates_args=())
def _fused_moe_op(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                  expert_map: Tensor | None) -> Tensor:
    return fused_moe_launch(x, w13, w2, topk_weights, topk_ids, expert_map)


@_fused_moe_op.register_fake
def _fused_moe_fake(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                    expert_map: Tensor | None) -> Tensor:
    return x.new_empty(x.shape)


def takes_triton_moe(x: Tensor) -> bool:
    """True where the fused kernel runs: Triton present, x on CUDA in fp16/bf16/fp32, not turned off."""
    return ENABLED and triton is not None and x.is_cuda and x.dtype in DTYPES
