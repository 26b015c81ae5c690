"""Rotary position embedding (neox layout, as in Hugging Face Llama/Qwen/Mistral), with
Llama-3, linear and YaRN (DeepSeek) frequency scaling. cos/sin are cached once for every position.

DeepSeek's checkpoints lay their rotary dims out in interleaved pairs (x0, x1), (x2, x3), ...; its
models de-interleave q_pe/k_pe (`deinterleave`) and then rotate them here in the neox layout, which
gives transformers' interleaved rotation with the halves regrouped (dot products are unchanged)."""

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


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_factor(scaling: dict, max_positions: int | None) -> float:
    factor = scaling.get("factor")
    if factor is None:  # as transformers: the ratio of the context to the pretrained one
        if not max_positions:
            raise ValueError("yarn rope scaling without a factor needs max_position_embeddings")
        factor = max_positions / scaling["original_max_position_embeddings"]
    return float(factor)


def _yarn_inv_freq(head_dim: int, theta: float, scaling: dict,
                   max_positions: int | None) -> tuple[torch.Tensor, float]:
    """YaRN: low frequencies interpolated by `factor`, high ones kept, a linear ramp between the
    beta_fast/beta_slow rotation counts; cos/sin scaled by the attention factor (transformers'
    _compute_yarn_parameters)."""
    factor = _yarn_factor(scaling, max_positions)
    if "original_max_position_embeddings" not in scaling:
        raise ValueError("yarn rope scaling needs original_max_position_embeddings")
    old_ctx = scaling["original_max_position_embeddings"]
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all:
            attention = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all)
        else:
            attention = yarn_get_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention)


def yarn_softmax_scale(scaling: dict | None, base: float) -> float:
    """The attention softmax scale of an MLA model: base times mscale^2 when YaRN's mscale_all_dim is
    set (DeepSeek scales the whole q.k, not just the rotary dims)."""
    if scaling is None or scaling.get("rope_type", "default") == "default":
        return base
    mscale_all = scaling.get("mscale_all_dim") or 0
    if not mscale_all:
        return base
    mscale = yarn_get_mscale(float(scaling.get("factor") or 1.0), mscale_all)
    return base * mscale * mscale


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None,
                  max_positions: int | None = None) -> tuple[torch.Tensor, float, float]:
    """Inverse frequencies, the position divisor and the cos/sin multiplier for the configured rope
    type (max_positions: the config's max_position_embeddings, which YaRN may read)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv_freq, 1.0, 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0, 1.0
    if kind == "linear":
        return inv_freq, float(scaling["factor"]), 1.0
    if kind == "yarn":
        inv_freq, attention = _yarn_inv_freq(head_dim, theta, scaling, max_positions)
        return inv_freq, 1.0, attention
    raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, llama3, linear, yarn)")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None,
                 config_max_positions: int | None = None) -> None:
        super().__init__()
        inv_freq, divisor, magnitude = rope_inv_freq(head_dim, theta, scaling, config_max_positions)
        positions = torch.arange(max_positions, dtype=torch.float32) / divisor
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", emb.cos() * magnitude, persistent=False)
        self.register_buffer("sin_cache", emb.sin() * magnitude, persistent=False)
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


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] in interleaved pairs (x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...), the neox
    halves: DeepSeek's rotary dims, ready for apply_rotary / rotate_fn."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
