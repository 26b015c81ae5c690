"""Qwen3: the Llama decoder with RMSNorm over each head of q and k before rotary (ModelConfig.qk_norm)."""

from __future__ import annotations

from radixserve.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Named for the logs; its differences from Llama are in ModelConfig."""
