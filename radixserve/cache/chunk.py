"""ChunkCache: the no-sharing cache used with --disable-radix-cache.

Every request owns all of its slots; "caching" an unfinished request only records its own slots
as its prefix so the next prefill chunk can attend to them.
"""

from __future__ import annotations

from typing import Any

from radixserve.cache.base import CacheableRequest, MatchResult, PrefixCache


class ChunkCache(PrefixCache):
    def match_prefix(self, key: list[int]) -> MatchResult:
        return MatchResult(indices=self.empty_indices(), last_node=None)

    def inc_lock_ref(self, node: Any) -> None:
        pass

    def dec_lock_ref(self, node: Any) -> None:
        pass

    def cache_finished_req(self, req: CacheableRequest) -> None:
        if req.req_pool_idx is not None:
            _, _, slots = self._committed(req)
            self.allocator.free(slots)  # frees whole pages, including an unaligned tail's
        self._release_row(req)

    def cache_unfinished_req(self, req: CacheableRequest) -> None:
        _, _, slots = self._committed(req)
        req.prefix_indices = slots.clone()

    def evict(self, num_tokens: int) -> int:
        return 0

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def total_size(self) -> int:
        return 0

    def reset(self) -> None:
        pass
