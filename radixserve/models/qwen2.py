"""Qwen2: the Llama decoder with biases on the q/k/v projections."""

from __future__ import annotations

from radixserve.models.llama import LlamaForCausalLM, ProjectionBiases


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def projection_biases(cfg) -> ProjectionBiases:
        # always q/k/v and nothing else, whatever the config says (transformers ignores the flags)
        return ProjectionBiases(qkv=True)
