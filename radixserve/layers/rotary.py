"""Rotary position embedding (neox layout, as in Hugging Face Llama/Qwen/Mistral), with
Llama-3 and linear frequency scaling. cos/sin are cached once for every position."""

from __future__ import annotations

import math

import torch
from torch import nn

try:  # the fused Triton kernel serves CUDA tensors
    from radixserve.layers import fused
except ImportError:
    fused = None


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the position divisor for the configured rope type."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv_freq, 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    if kind == "linear":
        return inv_freq, float(scaling["factor"])
    raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, llama3, linear)")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        inv_freq, divisor = rope_inv_freq(head_dim, theta, scaling)
        positions = torch.arange(max_positions, dtype=torch.float32) / divisor
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", emb.cos(), persistent=False)
        self.register_buffer("sin_cache", emb.sin(), persistent=False)
        self.head_dim = head_dim

    def rotate_fn(self, positions: torch.Tensor, dtype: torch.dtype, device: torch.device):
        """A function rotating qk [T, H, D] for these positions: the fused kernel in place on CUDA,
        else torch ops on cos/sin looked up once for every layer."""
        if device.type == "cuda" and fused is not None and not torch.compiler.is_compiling():  # inductor fuses it
            return lambda qk: fused.rotary_inplace(qk, positions, self.cos_cache, self.sin_cache)
        cos, sin = self.cos_sin(positions, dtype)
        return lambda qk: apply_rotary(qk, cos, sin)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, D] cos and sin for these positions: looked up once per forward, shared by all layers."""
        return (self.cos_cache[positions].unsqueeze(1).to(dtype), self.sin_cache[positions].unsqueeze(1).to(dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated in the neox layout (halves, not interleaved pairs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, rotated, sin)
