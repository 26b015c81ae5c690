"""Mixtral: the Mistral decoder with a sparse feed-forward in every layer (top-2 of 8, renormalised)."""

from __future__ import annotations

from radixserve.models.moe import MoECausalLM


class MixtralForCausalLM(MoECausalLM):
    def checkpoint_target(self, name: str) -> tuple[str, object]:
        # Mixtral's checkpoints call the feed-forward block_sparse_moe; transformers 5 and we call it mlp
        return super().checkpoint_target(name.replace(".block_sparse_moe.", ".mlp."))
