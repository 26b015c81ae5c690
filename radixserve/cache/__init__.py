"""KV memory: pools, the paged slot allocator and the prefix caches."""

from __future__ import annotations

from radixserve.cache.allocator import KVAllocator
from radixserve.cache.base import CacheableRequest, MatchResult, PrefixCache
from radixserve.cache.chunk import ChunkCache
from radixserve.cache.pools import KVPool, ReqToTokenPool
from radixserve.cache.radix import RadixCache, TreeNode

__all__ = [
    "CacheableRequest",
    "ChunkCache",
    "KVAllocator",
    "KVPool",
    "MatchResult",
    "PrefixCache",
    "RadixCache",
    "ReqToTokenPool",
    "TreeNode",
]
