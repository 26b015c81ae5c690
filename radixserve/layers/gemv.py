"""A Triton GEMV for projections of one row (batch-1 decode), where reading the weight is the cost.

At batch 1 every projection is a matrix-vector product bound by HBM bandwidth. Inside a CUDA graph,
with weights that do not fit in L2 (as in a decode step), this kernel read the Llama-3.1-8B
projections 4-36% faster than torch's matmul (cuBLAS) on an H200: each program owns two output
rows and reads them in 4096-wide steps, so there are many small programs in flight and no split-K
reduction kernel after them (`scripts/gpu_gemv_bench.py`, `docs/gpu.md`).

`linear` takes it for one row of bf16/fp16 on CUDA and falls back to `F.linear` everywhere else
(CPU, fp32, several rows, torch.compile tracing). RADIXSERVE_TRITON_GEMV=0 turns it off (for A/B
timing).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton keep F.linear
    triton = None

ENABLED = os.environ.get("RADIXSERVE_TRITON_GEMV", "1") != "0"
MAX_BLOCK_K = 4096  # the widest step that won for every 8B shape (H200)
TILE_ELEMENTS = 8192  # BLOCK_N * BLOCK_K: two 4096-wide rows per program


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, n_out, k_in, w_stride, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n_out
        row_ptr = w_ptr + rows[:, None].to(tl.int64) * w_stride
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, k_in, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_mask = cols < k_in
            x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            w = tl.load(row_ptr + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] holding one row, weight [N, K] (nn.Linear's layout, rows contiguous) -> [..., N]."""
    n_out, k_in = weight.shape
    assert x.numel() == k_in and weight.stride(1) == 1, (x.shape, weight.shape, weight.stride())
    x_row = x.reshape(k_in)
    if x_row.stride(0) != 1:
        x_row = x_row.contiguous()
    block_k = min(MAX_BLOCK_K, triton.next_power_of_2(k_in))
    block_n = max(2, TILE_ELEMENTS // block_k)
    out = torch.empty(n_out, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n_out, block_n),)](
        x_row, weight, bias if bias is not None else weight, out, n_out, k_in, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out.view(*x.shape[:-1], n_out)


def takes_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when `linear` would run the Triton GEMV for these operands."""
    return (ENABLED and triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and x.numel() == weight.shape[1] and weight.stride(1) == 1
            and not torch.compiler.is_compiling())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the Triton GEMV for one half-precision row on CUDA."""
    if takes_gemv(x, weight):
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)
