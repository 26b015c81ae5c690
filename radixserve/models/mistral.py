"""Mistral: the Llama decoder without biases (its sliding window is handled by capping the context length)."""

from __future__ import annotations

from radixserve.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    """Named for the logs; its differences from Llama are in ModelConfig."""
