"""SiLU-and-mul over a fused gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # the fused Triton kernel serves CUDA tensors; CPU keeps the torch code below
    from radixserve.layers import fused
except ImportError:
    fused = None


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and fused is not None and not torch.compiler.is_compiling():  # inductor fuses the torch code
            return fused.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
