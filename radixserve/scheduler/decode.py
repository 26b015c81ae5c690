"""Make room for one decode step: retract requests (back to the waiting queue) when KV runs short."""

from __future__ import annotations

from typing import TYPE_CHECKING

from radixserve.scheduler.kv import free_kv_of

if TYPE_CHECKING:
    from radixserve.cache.base import PrefixCache
    from radixserve.cache.memory import MemoryPools
    from radixserve.scheduler.req import Req


def decode_tokens_needed(reqs: list[Req], page_size: int) -> int:
    # each request writes the KV of its last token at position kv_committed_len
    return sum(page_size for r in reqs if r.kv_committed_len % page_size == 0)


def retract_for_decode(running: list[Req], pools: MemoryPools, cache: PrefixCache) -> list[Req]:
    """Retract requests until one decode step of the rest fits. Returns the retracted ones (the caller
    moves them to WAITING), which keep their generated tokens and will be prefilled again."""
    page = pools.allocator.page_size
    retracted: list[Req] = []

    def short() -> bool:
        free = pools.allocator.available_size() + cache.evictable_size()
        return decode_tokens_needed(running, page) > free

    if not short():
        return retracted
    # retract the requests that lose least: fewest generated tokens, then longest prompts
    running.sort(key=lambda r: (len(r.output_ids), -len(r.origin_input_ids)), reverse=True)
    while short() and len(running) > 1:
        victim = running.pop()
        free_kv_of(victim, cache)
        retracted.append(victim)
    return retracted
