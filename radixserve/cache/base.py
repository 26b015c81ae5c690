"""Interface shared by the prefix caches (RadixCache, ChunkCache) and the request view they use."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from radixserve.cache.allocator import KVAllocator
from radixserve.cache.pools import ReqToTokenPool


class CacheableRequest(Protocol):
    """The attributes of a scheduler request that the caches read and write."""

    origin_input_ids: list[int]
    output_ids: list[int]
    req_pool_idx: int | None
    prefix_indices: torch.Tensor  # int64 slots of the cached prefix
    last_node: Any  # cache node locked for this request, or None
    kv_committed_len: int  # tokens of origin_input_ids + output_ids whose KV is in req_to_token


@dataclass
class MatchResult:
    indices: torch.Tensor  # int64 KV slots of the matched prefix; length is a multiple of page_size
    last_node: Any  # node to lock while the request uses the prefix (None for ChunkCache)


class PrefixCache(ABC):
    """Owns the KV slots of cached prefixes and decides what a finished request leaves behind."""

    def __init__(self, req_to_token_pool: ReqToTokenPool, allocator: KVAllocator, page_size: int):
        if page_size != allocator.page_size:
            raise ValueError(f"cache page_size {page_size} != allocator page_size {allocator.page_size}")
        self.req_to_token_pool = req_to_token_pool
        self.allocator = allocator
        self.page_size = page_size
        self.device = allocator.device

    @abstractmethod
    def match_prefix(self, key: list[int]) -> MatchResult: ...

    @abstractmethod
    def inc_lock_ref(self, node: Any) -> None: ...

    @abstractmethod
    def dec_lock_ref(self, node: Any) -> None: ...

    @abstractmethod
    def cache_finished_req(self, req: CacheableRequest) -> None: ...

    @abstractmethod
    def cache_unfinished_req(self, req: CacheableRequest) -> None: ...

    @abstractmethod
    def evict(self, num_tokens: int) -> int: ...

    @abstractmethod
    def evictable_size(self) -> int: ...

    @abstractmethod
    def protected_size(self) -> int: ...

    @abstractmethod
    def total_size(self) -> int: ...

    @abstractmethod
    def reset(self) -> None: ...

    # ---- helpers for subclasses --------------------------------------------------------------

    def empty_indices(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.device)

    def _committed(self, req: CacheableRequest) -> tuple[int, list[int], torch.Tensor]:
        """(row, tokens, slots) of the request's committed KV; slots is a view into req_to_token."""
        row = req.req_pool_idx
        assert row is not None
        n = req.kv_committed_len
        tokens = (list(req.origin_input_ids) + list(req.output_ids))[:n]
        if len(tokens) != n:
            raise ValueError(f"kv_committed_len={n} exceeds the request's {len(tokens)} tokens")
        return row, tokens, self.req_to_token_pool.req_to_token[row, :n]

    def _release_row(self, req: CacheableRequest) -> None:
        row = req.req_pool_idx
        if row is not None:
            self.req_to_token_pool.free(row)
        req.req_pool_idx = None
        # The prefix slots may be freed or evicted from now on; don't let the request keep using them.
        req.prefix_indices = self.empty_indices()
        req.last_node = None
