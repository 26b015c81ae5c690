"""Qwen2-MoE: the Qwen2 decoder with experts plus a gated shared expert (ModelConfig.moe)."""

from __future__ import annotations

from radixserve.models.moe import MoECausalLM


class Qwen2MoeForCausalLM(MoECausalLM):
    """Named for the logs; the shared expert and sparse-layer pattern come from ModelConfig."""
