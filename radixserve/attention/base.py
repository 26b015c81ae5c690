"""The attention backend interface: metadata per batch, then extend or decode per layer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from radixserve.model_executor.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    def init_forward_metadata(self, batch: ForwardBatch) -> None:  # noqa: B027 - optional hook
        """Precompute what every layer of this batch shares (index tensors, masks)."""

    @abstractmethod
    def forward_extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayerSpec, batch: ForwardBatch
    ) -> torch.Tensor: ...

    @abstractmethod
    def forward_decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayerSpec, batch: ForwardBatch
    ) -> torch.Tensor: ...

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayerSpec, batch: ForwardBatch
    ) -> torch.Tensor:
        if batch.is_decode:
            return self.forward_decode(q, k, v, layer, batch)
        return self.forward_extend(q, k, v, layer, batch)

    # MLA (DeepSeek): q [T, H, D] in the absorbed form, latent [T, D] -> [T, H, kv_lora_rank]. Both
    # first write latent at batch.out_cache_loc, then attend over keys read back from the pool.
    def forward_mla(self, q: torch.Tensor, latent: torch.Tensor, layer: MLALayerSpec,
                    batch: ForwardBatch) -> torch.Tensor:
        if batch.is_decode:
            return self.forward_mla_decode(q, latent, layer, batch)
        return self.forward_mla_extend(q, latent, layer, batch)

    def forward_mla_decode(self, q: torch.Tensor, latent: torch.Tensor, layer: MLALayerSpec,
                           batch: ForwardBatch) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no MLA decode (DeepSeek); use torch_native")

    def forward_mla_extend(self, q: torch.Tensor, latent: torch.Tensor, layer: MLALayerSpec,
                           batch: ForwardBatch) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no MLA extend (DeepSeek); use torch_native")


class AttentionLayerSpec(torch.nn.Module):
    """Per-layer attention shape, and the call into the batch's backend (the KV pool write included)."""

    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scaling = scaling

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q [T, Hq*D], k/v [T, Hk*D] -> [T, Hq*D]."""
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = batch.attn_backend.forward(q, k, v, self, batch)
        return out.reshape(-1, self.num_heads * self.head_dim)


class MLALayerSpec(torch.nn.Module):
    """One layer of multi-head latent attention (DeepSeek) in the absorbed form: every head's query is
    kv_lora_rank + qk_rope_head_dim wide and attends to the one shared latent; the output is each
    head's weighted sum of the latents' first kv_lora_rank columns."""

    num_kv_heads = 1

    def __init__(self, layer_id: int, num_heads: int, kv_lora_rank: int, qk_rope_head_dim: int,
                 scaling: float) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.kv_lora_rank = kv_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.head_dim = kv_lora_rank  # the output width (what graph/workspace sizing reads)
        self.scaling = scaling

    def forward(self, q: torch.Tensor, latent: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q [T, H, D], latent [T, D] -> [T, H, kv_lora_rank]."""
        return batch.attn_backend.forward_mla(q, latent, self, batch)
