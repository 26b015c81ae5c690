"""Mistral: the Llama decoder (its sliding window is handled by capping the context length)."""

from __future__ import annotations

from radixserve.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
