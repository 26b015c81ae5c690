"""Qwen2: the Llama decoder with biases on the q/k/v projections."""

from __future__ import annotations

from radixserve.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg, max_positions: int) -> None:
        # Qwen2 configs carry no attention_bias flag: the q/k/v biases are always there.
        if getattr(cfg, "attention_bias", None) is None:
            cfg.attention_bias = True
        super().__init__(cfg, max_positions)
