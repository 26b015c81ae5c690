"""Mistral: the Llama decoder (its sliding window is handled by capping the context length)."""

from __future__ import annotations

from radixserve.models.llama import LlamaForCausalLM, ProjectionBiases


class MistralForCausalLM(LlamaForCausalLM):
    @staticmethod
    def projection_biases(cfg) -> ProjectionBiases:
        return ProjectionBiases()  # no projection has a bias
