"""The block-FP8 GEMM by cuBLAS (torch's F.scaled_mm with 1x128 activation and 128x128 weight scales):
what fp8_kernels.w8a8_block_fp8_matmul computes, faster from about 128 rows (docs/fp8.md), for the
weights cuBLAS takes. fp8_kernels picks it from GEMM_CUBLAS_MIN_M rows."""

from __future__ import annotations

import torch
from torch import Tensor

_HAS_SCALED_MM = hasattr(torch.nn.functional, "scaled_mm")  # torch's block-scaled GEMM (cuBLAS)


def cublas_block_fp8_fits(w_fp8: Tensor, block: tuple[int, int]) -> bool:
    """Whether cuBLAS's block-scaled GEMM takes this weight: a CUDA tensor in a torch with F.scaled_mm,
    128 x 128 blocks, K whole blocks in a multiple of 4 (the column-major scale's leading dimension,
    16-byte aligned), N a multiple of 16, a contiguous weight."""
    n, k = w_fp8.shape
    return (w_fp8.is_cuda and _HAS_SCALED_MM and tuple(block) == (128, 128)
            and k % 512 == 0 and n % 16 == 0 and w_fp8.is_contiguous())


def cublas_block_fp8_matmul(x_fp8: Tensor, x_scales: Tensor, w_fp8: Tensor, w_scale_inv: Tensor,
                            out_dtype: torch.dtype = torch.bfloat16, bias: Tensor | None = None) -> Tensor:
    """What w8a8_block_fp8_matmul computes, by cuBLAS (torch's F.scaled_mm): the activation's scales
    1x128 and the weight's 128x128, each laid out column-major as cuBLAS reads them. M is padded to a
    multiple of 4 for the same alignment (the pad rows are dropped). Where cublas_block_fp8_fits."""
    functional = torch.nn.functional
    m = x_fp8.shape[0]
    pad = -m % 4
    if pad:
        x_fp8 = torch.cat([x_fp8, x_fp8.new_zeros((pad, x_fp8.shape[1]))])
        x_scales = torch.cat([x_scales, x_scales.new_ones((pad, x_scales.shape[1]))])
    # with a bias the sum stays fp32 until the bias is in: adding it to a rounded output loses the
    # low bits of a result that cancels against it
    out = functional.scaled_mm(x_fp8, w_fp8.t(), x_scales.float().t().contiguous().t(),
                               functional.ScalingType.BlockWise1x128, w_scale_inv.float().t(),
                               functional.ScalingType.BlockWise128x128,
                               output_dtype=out_dtype if bias is None else torch.float32)
    if pad:
        out = out[:m]
    return out if bias is None else (out + bias.float()).to(out_dtype)
