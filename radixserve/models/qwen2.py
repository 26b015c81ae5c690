"""Qwen2: the Llama decoder with biases on the q/k/v projections (ModelConfig sets them)."""

from __future__ import annotations

from radixserve.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Named for the logs; its differences from Llama are in ModelConfig."""
