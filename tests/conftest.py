"""Test-wide setup. Without a GPU, Triton kernels run in Triton's interpreter on the CPU; the flag
must be set before anything imports triton (engine modules do, through the fused layers)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
