"""FP8 GEMV on the tensor cores (batch 1), two forms of one Triton kernel.

Why: the CUDA-core GEMV (fp8_kernels._fp8_gemv_kernel) turns every weight into fp32 before its
multiply-add. On Hopper that is two conversions an element (e4m3x2 -> f16x2, then f16 -> f32), on the
GPU's slow conversion pipe, and it caps the kernel near 2.5 TB/s, below the bf16 GEMV. Here the weight
tile goes to the tensor cores instead:

- `mma16` (weight-only): the e4m3 tile is widened to fp16 (one packed conversion per two weights,
  exact: every e4m3 value is an fp16 value) and multiplied with the activation in fp16, fp32
  accumulation. The activation keeps its precision (bf16 -> fp16 is exact in fp16's normal range), so
  the numerics are the CUDA-core GEMV's: F.linear(x, dequant(w)) up to summation order. x is scaled by
  2^-8 on the way into fp16 (undone in fp32 after the sum) so that |x| up to 2^24 stays finite; values
  below 2^-6 then lose relative precision as fp16 subnormals, which changes the sum by < 1e-5 |w|
  an element.
- `mma8` (w8a8): the activation is quantized per 128-column group beforehand (per_token_group_quant_fp8,
  one more launch) and the tiles meet in an e4m3 x e4m3 MMA, as the batched w8a8 GEMM does: the same
  numerics as a batch of one through block_fp8_linear, no conversion at all.

A matrix multiply needs at least 16 columns on the activation side. Instead of padding x to 16 identical
or zero columns, column j of the [BLOCK_K, 16] operand holds the activation of the step's j-th
128-column group and zeros elsewhere (block diagonal): one MMA then yields each group's partial sums
side by side, [BLOCK_N, 16], and every column is multiplied by its own block factor (weight factor,
times the activation's group scale in `mma8`) before the fp32 accumulate. A step covers GROUPS <= 16
quant groups, so the weight tile is [BLOCK_N, GROUPS * GROUP_K]. BLOCK_N divides the weight's block
rows (GROUP_N), so a program's rows share one row of block factors, as in the CUDA-core GEMV.
"""

from __future__ import annotations

from torch import Tensor

from radixserve.layers.quantization.fp8_utils import FP8_DTYPE

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton never reach these kernels
    triton = None

# (BLOCK_N, GROUPS, num_warps, num_stages): the default tile; scripts/gpu_fp8_gemm_bench.py --sweep times others
MMA_GEMV_TILE = (32, 8, 4, 3)
X_SHIFT = 2.0**-8  # mma16: the activation's power-of-two scale into fp16
KINDS = ("mma16", "mma8")

if triton is not None:
    _X_SHIFT = tl.constexpr(X_SHIFT)
    _X_UNSHIFT = tl.constexpr(1.0 / X_SHIFT)

    @triton.jit
    def _fp8_gemv_mma_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, n, k, w_stride, ws_stride,
                             GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, W8A8: tl.constexpr,
                             HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
        BLOCK_K: tl.constexpr = GROUPS * GROUP_K
        start = tl.program_id(0) * BLOCK_N
        rows = start + tl.arange(0, BLOCK_N)
        w_rows = w_ptr + tl.minimum(rows, n - 1)[:, None].to(tl.int64) * w_stride
        s_row = ws_ptr + (start // GROUP_N) * ws_stride
        ks = tl.arange(0, BLOCK_K)
        lanes = tl.arange(0, 16)
        diag = (ks // GROUP_K)[:, None] == lanes[None, :]  # column j holds the step's group j
        num_groups = tl.cdiv(k, GROUP_K)
        acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            cols = k0 + ks
            if k0 + BLOCK_K <= k:
                w = tl.load(w_rows + cols[None, :])
                x = tl.load(x_ptr + cols)
            else:  # the tail: zeros past K add nothing
                col_mask = cols < k
                w = tl.load(w_rows + cols[None, :], mask=col_mask[None, :], other=0.0)
                x = tl.load(x_ptr + cols, mask=col_mask, other=0.0)
            groups = k0 // GROUP_K + lanes
            g_mask = (lanes < GROUPS) & (groups < num_groups)
            factor = tl.load(s_row + groups, mask=g_mask, other=0.0)
            if W8A8:
                factor *= tl.load(xs_ptr + groups, mask=g_mask, other=0.0)
                # select on the bytes: no conversion of x at all
                xb = tl.where(diag, x.to(tl.uint8, bitcast=True)[:, None], 0).to(tl.uint8)
                part = tl.dot(w, xb.to(tl.float8e4nv, bitcast=True))
            else:
                xh = (x.to(tl.float32) * _X_SHIFT).to(tl.float16)
                part = tl.dot(w.to(tl.float16), tl.where(diag, xh[:, None], 0.0).to(tl.float16))
            acc += part * factor[None, :]
        out = tl.sum(acc, axis=1)
        if not W8A8:
            out = out * _X_UNSHIFT
        row_mask = rows < n
        if HAS_BIAS:
            out += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_mask)


def mma_gemv_tile(block: tuple[int, int], k: int,
                  tile: tuple[int, int, int, int] = MMA_GEMV_TILE) -> tuple[int, int, int, int] | None:
    """(BLOCK_N, GROUPS, num_warps, num_stages) for a weight with `block` scales and K columns, or None
    where the kernel does not apply: the block's rows must be a multiple of 16 (BLOCK_N divides them
    and an MMA needs 16) and its columns a power of two of at least 16."""
    bn, bk = block
    if bn % 16 or bk < 16 or bk & (bk - 1):
        return None
    block_n, groups, warps, stages = tile
    while bn % block_n:
        block_n //= 2
    block_n = max(block_n, 16)
    groups = max(min(groups, 16, triton.next_power_of_2(-(-k // bk))), -(-32 // bk))  # an e4m3 MMA takes K >= 32
    return block_n, groups, warps, stages


def fp8_gemv_mma(x: Tensor, w_fp8: Tensor, w_scale_inv: Tensor, block: tuple[int, int], bias: Tensor | None,
                 kind: str = "mma16", tile: tuple[int, int, int, int] | None = None) -> Tensor:
    """x [..., K] holding one row times the block-quantized weight -> [..., N] in x's dtype, on the tensor
    cores (`kind` mma16 or mma8, see the module doc). `tile` overrides MMA_GEMV_TILE (the bench's sweeps).
    The caller checks mma_gemv_tile(block, K) is not None."""
    from radixserve.layers.quantization.fp8_kernels import per_token_group_quant_fp8

    n, k = w_fp8.shape
    bn, bk = block
    assert kind in KINDS, kind
    assert x.numel() == k and w_fp8.stride(1) == 1 and w_fp8.dtype == FP8_DTYPE, (x.shape, w_fp8.shape)
    assert w_scale_inv.shape == (-(-n // bn), -(-k // bk)), (w_scale_inv.shape, block)
    block_n, groups, warps, stages = mma_gemv_tile(block, k, tile or MMA_GEMV_TILE)
    row = x.reshape(1, k)
    out = x.new_empty((*x.shape[:-1], n))
    if kind == "mma8":
        row, x_scales = per_token_group_quant_fp8(row, bk)
    else:
        row, x_scales = (row if row.stride(1) == 1 else row.contiguous()), w_scale_inv
    _fp8_gemv_mma_kernel[(triton.cdiv(n, block_n),)](
        row, x_scales, w_fp8, w_scale_inv.float().contiguous(), bias if bias is not None else out, out, n, k,
        w_fp8.stride(0), w_scale_inv.shape[1], GROUP_N=bn, GROUP_K=bk, W8A8=kind == "mma8",
        HAS_BIAS=bias is not None, BLOCK_N=block_n, GROUPS=groups, num_warps=warps, num_stages=stages,
    )
    return out

