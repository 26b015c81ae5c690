"""RMSNorm, with the residual add fused into the same call (the GPU path swaps in a kernel)."""

from __future__ import annotations

import torch
from torch import nn

try:  # the fused Triton kernels serve CUDA tensors; CPU keeps the torch code below
    from radixserve.layers import fused
except ImportError:
    fused = None


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.is_cuda and fused is not None and not torch.compiler.is_compiling():  # inductor fuses the torch code
            return fused.rmsnorm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual
