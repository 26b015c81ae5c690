"""Triton GEMV for projections of a single row (batch-1 decode), where reading the weight is the cost.

At batch 1 each projection is a matrix-vector product bound by HBM bandwidth. cuBLAS reads the
narrow ones well below it and follows two of them with a split-K reduction kernel; this kernel gives
each program BLOCK_N output rows and walks K in BLOCK_K-wide steps, so thousands of small programs
keep the memory system busy and no second kernel is needed. The measurements against cuBLAS are in
docs/gpu.md ("Batch-1 projections"; scripts/gpu_gemv_bench.py, scripts/gpu_step_kernels.py).

The gate/up projection rides on it fused with SiLU-and-mul (a program owns matching rows of gate and
up, so the activation is written directly). Outputs are rounded to the activation dtype as cuBLAS's
are, logits included: a request's tokens then do not depend on whether it ran alone, in a batch or
under torch.compile more than the summation order makes them.

`takes_gemv` decides: one row, bf16/fp16, CUDA, rows of the weight contiguous. Everything else keeps
F.linear. Under torch.compile the kernels are custom ops, so the compiled batch-1 graph keeps them. RADIXSERVE_TRITON_GEMV=0 turns it off (A/B).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton keep F.linear
    triton = None

ENABLED = os.environ.get("RADIXSERVE_TRITON_GEMV", "1") != "0"
# A program reads BLOCK_N rows x BLOCK_K columns per step: two rows of 2048 with 4 warps, the tile
# scripts/gpu_gemv_bench.py picked (docs/gpu.md).
MAX_BLOCK_K = 2048
TILE_ELEMENTS = 4096
NUM_WARPS = 4

# The loop body below picks an unmasked load for full steps and a masked one for the tail, and rows
# past the end are clamped rather than masked, so that every load of a step is issued before the
# first multiply (a thread's 16-byte loads all in flight at once); masks on every load serialise
# them. Each kernel spells its step out rather than share a load helper, which also split the loads.
# docs/gpu.md ("Batch-1 projections") has the schedules this was checked against.
if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, n_out, k_in, w_stride, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        w_rows = w_ptr + tl.minimum(rows, n_out - 1)[:, None].to(tl.int64) * w_stride
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, k_in, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            if k0 + BLOCK_K <= k_in:
                x = tl.load(x_ptr + cols)
                w = tl.load(w_rows + cols[None, :])
            else:
                col_mask = cols < k_in
                x = tl.load(x_ptr + cols, mask=col_mask, other=0.0)
                w = tl.load(w_rows + cols[None, :], mask=col_mask[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        row_mask = rows < n_out
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask)

    @triton.jit
    def _gemv_silu_mul_kernel(x_ptr, w_ptr, out_ptr, n_out, k_in, w_stride, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr):
        """out[i] = silu(gate[i]) * up[i], gate = rows [0, n_out) of w @ x, up = rows [n_out, 2 n_out)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        gate_rows = w_ptr + tl.minimum(rows, n_out - 1)[:, None].to(tl.int64) * w_stride
        up_rows = gate_rows + n_out.to(tl.int64) * w_stride
        gate = tl.zeros([BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, k_in, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            if k0 + BLOCK_K <= k_in:
                x = tl.load(x_ptr + cols)
                wg = tl.load(gate_rows + cols[None, :])
                wu = tl.load(up_rows + cols[None, :])
            else:
                col_mask = cols < k_in
                x = tl.load(x_ptr + cols, mask=col_mask, other=0.0)
                wg = tl.load(gate_rows + cols[None, :], mask=col_mask[None, :], other=0.0)
                wu = tl.load(up_rows + cols[None, :], mask=col_mask[None, :], other=0.0)
            x = x.to(tl.float32)[None, :]
            gate += tl.sum(wg.to(tl.float32) * x, axis=1)
            up += tl.sum(wu.to(tl.float32) * x, axis=1)
        dtype = out_ptr.dtype.element_ty
        # round where the unfused path does: the projection's output, then silu(gate), then the product
        gate = gate.to(dtype).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        tl.store(out_ptr + rows, (act * up.to(dtype).to(tl.float32)).to(dtype), mask=rows < n_out)


def _row(x: torch.Tensor, k_in: int) -> torch.Tensor:
    row = x.reshape(k_in)
    return row if row.stride(0) == 1 else row.contiguous()


def _tile(k_in: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K): TILE_ELEMENTS weights per step (per row group: gate and up each get one)."""
    block_k = min(MAX_BLOCK_K, triton.next_power_of_2(k_in))
    return max(1, TILE_ELEMENTS // block_k), block_k


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] holding one row, weight [N, K] (nn.Linear's layout, rows contiguous) -> [..., N]."""
    if torch.compiler.is_compiling():  # one opaque node in the traced graph
        return _gemv_op(x, weight, bias)
    return _launch_gemv(x, weight, bias)


def gemv_silu_mul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for one row x [..., K] and a fused gate/up weight [2I, K] (gate rows first)
    -> [..., I]: the gate/up projection and the activation in one kernel."""
    if torch.compiler.is_compiling():
        return _gemv_silu_mul_op(x, weight)
    return _launch_gemv_silu_mul(x, weight)


def _launch_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n_out, k_in = weight.shape
    assert x.numel() == k_in and weight.stride(1) == 1, (x.shape, weight.shape, weight.stride())
    block_n, block_k = _tile(k_in)
    out = x.new_empty((*x.shape[:-1], n_out))
    _gemv_kernel[(triton.cdiv(n_out, block_n),)](
        _row(x, k_in), weight, bias if bias is not None else weight, out, n_out, k_in, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=NUM_WARPS,
    )
    return out


def _launch_gemv_silu_mul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    two_i, k_in = weight.shape
    assert two_i % 2 == 0 and x.numel() == k_in and weight.stride(1) == 1, (x.shape, weight.shape)
    n_out = two_i // 2
    block_n, block_k = _tile(k_in)
    out = x.new_empty((*x.shape[:-1], n_out))
    _gemv_silu_mul_kernel[(triton.cdiv(n_out, block_n),)](
        _row(x, k_in), weight, out, n_out, k_in, weight.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=NUM_WARPS,
    )
    return out


# The same launches as custom ops, for torch.compile: Dynamo cannot trace a Triton launch written
# this way, and Inductor would otherwise turn the one-row projection back into an mm. Eager calls go
# straight to the launch (the op's dispatch costs host time a non-graph step would feel).
@torch.library.custom_op("radixserve::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _launch_gemv(x, weight, bias)


@_gemv_op.register_fake
def _gemv_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("radixserve::gemv_silu_mul", mutates_args=())
def _gemv_silu_mul_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _launch_gemv_silu_mul(x, weight)


@_gemv_silu_mul_op.register_fake
def _gemv_silu_mul_fake(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))


def takes_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when x is one half-precision row on CUDA that the Triton GEMV can multiply by weight."""
    return (ENABLED and triton is not None and runs_gemv_on(x) and weight.dtype == x.dtype
            and weight.stride(1) == 1
            # a batch dimension traced as dynamic is never taken to be 1 (and no guard is added)
            and statically_known_true(x.numel() == weight.shape[1]))


def runs_gemv_on(x: torch.Tensor) -> bool:
    """CUDA and half precision: where the kernel was tuned and beats cuBLAS (fp32 rows keep cuBLAS)."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the Triton GEMV where `takes_gemv` says so."""
    if takes_gemv(x, weight):
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)
