"""Qwen3-MoE: the Qwen3 decoder (q/k norms) with experts in its sparse layers (ModelConfig.moe)."""

from __future__ import annotations

from radixserve.models.moe import MoECausalLM


class Qwen3MoeForCausalLM(MoECausalLM):
    """Named for the logs; its differences are in ModelConfig."""
