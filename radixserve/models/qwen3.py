"""Qwen3: the Llama decoder with RMSNorm over each head of q and k before rotary."""

from __future__ import annotations

from radixserve.models.llama import LlamaForCausalLM, ProjectionBiases


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True

    @staticmethod
    def projection_biases(cfg) -> ProjectionBiases:
        attn = bool(getattr(cfg, "attention_bias", False))  # q, k, v and o; the MLP never has one
        return ProjectionBiases(qkv=attn, o=attn)
