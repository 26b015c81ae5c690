"""The KV memory of one rank, made once and shared: the request table, the slot allocator, the KV
pool and each request row's newest token. The model runner reads and writes them in a forward pass;
the scheduler and the prefix cache decide who holds which slots."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from radixserve.cache.allocator import KVAllocator
from radixserve.cache.pools import KVPool, MLAKVPool, ReqToTokenPool


@dataclass
class MemoryPools:
    req_to_token: ReqToTokenPool
    allocator: KVAllocator
    kv: KVPool | MLAKVPool  # MLAKVPool: DeepSeek's one latent per token and layer
    # newest sampled token of each request row (row 0: padding): decode batches read their inputs here
    last_token: torch.Tensor

    @classmethod
    def create(cls, max_total_tokens: int, max_running_requests: int, context_len: int, page_size: int,
               num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               device: torch.device, kv_scales: Sequence[tuple[float, float]] | None = None) -> MemoryPools:
        """dtype is the KV pool's element type (the model's, or float8_e4m3fn with per-layer
        (k_scale, v_scale) in kv_scales; None: 1.0 each)."""
        return cls(
            req_to_token=ReqToTokenPool(max_running_requests, context_len, device),
            allocator=KVAllocator(max_total_tokens, page_size, device),
            kv=KVPool(max_total_tokens, page_size, num_layers, num_kv_heads, head_dim, dtype, device, kv_scales),
            last_token=torch.zeros(max_running_requests + 1, dtype=torch.int64, device=device),
        )

    @classmethod
    def create_mla(cls, max_total_tokens: int, max_running_requests: int, context_len: int, page_size: int,
                   num_layers: int, kv_lora_rank: int, qk_rope_head_dim: int, dtype: torch.dtype,
                   device: torch.device, latent_scales: Sequence[float] | None = None) -> MemoryPools:
        """The same, over a latent pool (MLA): one kv_lora_rank + qk_rope_head_dim row per token and layer."""
        return cls(
            req_to_token=ReqToTokenPool(max_running_requests, context_len, device),
            allocator=KVAllocator(max_total_tokens, page_size, device),
            kv=MLAKVPool(max_total_tokens, page_size, num_layers, kv_lora_rank, qk_rope_head_dim, dtype, device,
                         latent_scales),
            last_token=torch.zeros(max_running_requests + 1, dtype=torch.int64, device=device),
        )

    @property
    def page_size(self) -> int:
        return self.allocator.page_size

    @property
    def device(self) -> torch.device:
        return self.allocator.device

    def set_last_tokens(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Each row's newest token, for its next decode step: the sampler's output, or the first
        token of a request whose prompt was computed elsewhere."""
        self.last_token[rows] = tokens

    def clear(self) -> None:
        """Every row and slot free (the KV contents are left as they are)."""
        self.req_to_token.clear()
        self.allocator.clear()
