"""A request's KV slots: taking them (for a batch, or ahead of one), giving them back.

Slots are taken on the host and written into the request table on the device; when the pool is
short, cached prefixes nobody holds are evicted first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from radixserve.cache.base import PrefixCache
    from radixserve.cache.memory import MemoryPools
    from radixserve.scheduler.req import Req


class OutOfKVError(RuntimeError):
    """Not enough free KV slots even after evicting the whole unlocked cache."""


def last_slot_of(req: Req, pools: MemoryPools) -> int:
    """The slot of the request's newest committed position: kept on the host by the allocations
    below; read from the request table (a device read) only if something else moved it."""
    pos = req.kv_committed_len - 1
    if req.last_slot_pos == pos:
        return req.last_slot
    return int(pools.req_to_token.req_to_token[req.req_pool_idx, pos])


def alloc_slots(req: Req, n: int, pools: MemoryPools, cache: PrefixCache) -> torch.Tensor:
    """Host slots for the next n tokens of req, evicting cached prefixes when the pool is short.
    The caller writes them into the request table."""
    start = req.kv_committed_len
    allocator = pools.allocator
    # only a partly filled last page needs its last slot; with pages of 1 there is none
    last_slot = last_slot_of(req, pools) if start % allocator.page_size else 0
    slots = allocator.alloc_for_sequence(start, last_slot, n)
    if slots is None:
        need = allocator.pages_needed(start, n) * allocator.page_size
        cache.evict(need - allocator.available_size())
        slots = allocator.alloc_for_sequence(start, last_slot, n)
        if slots is None:
            raise OutOfKVError(f"need {need} KV slots, {allocator.available_size()} free")
    if n:
        req.last_slot, req.last_slot_pos = int(slots[-1]), start + n - 1
    return slots


def release_new_pages(reqs: list[Req], slots: list[torch.Tensor], pools: MemoryPools) -> None:
    """Undo alloc_slots for these requests: free the pages it took, not the partly filled last page
    each request already owned."""
    page = pools.allocator.page_size
    for req, req_slots in zip(reqs, slots):
        kept = min((-req.kv_committed_len) % page, req_slots.numel())  # slots in the owned page
        pools.allocator.free(req_slots[kept:])


def alloc_decode_slots(reqs: list[Req], pools: MemoryPools, cache: PrefixCache) -> torch.Tensor:
    """Host slots, one per request, for a decode step (one vectorised allocation), evicting if short."""
    allocator = pools.allocator
    page = allocator.page_size
    prefix_lens = [r.kv_committed_len for r in reqs]
    # only requests continuing a partly filled page need their last slot; pages of 1 never do
    last_slots = [0] * len(reqs) if page == 1 else [
        last_slot_of(r, pools) if n % page else 0 for r, n in zip(reqs, prefix_lens)
    ]
    slots = allocator.alloc_decode(prefix_lens, last_slots)
    if slots is None:
        need = sum(page for n in prefix_lens if n % page == 0)
        cache.evict(need - allocator.available_size())
        slots = allocator.alloc_decode(prefix_lens, last_slots)
        if slots is None:
            raise OutOfKVError(f"need {need} KV slots, {allocator.available_size()} free")
    if page > 1:
        for r, n, slot in zip(reqs, prefix_lens, slots.tolist()):
            r.last_slot, r.last_slot_pos = slot, n
    return slots


def allocate(req: Req, n: int, pools: MemoryPools, cache: PrefixCache) -> torch.Tensor:
    """Take a request row (if it has none) and the slots of its next n positions, outside any batch:
    what a decode server does before a prompt's KV arrives from elsewhere. The slots are written
    into the request table; the request's committed length is the caller's to advance once the KV
    is there. Raises OutOfKVError, taking nothing, when the pool cannot hold them."""
    took_row = req.req_pool_idx is None
    if took_row:
        row = pools.req_to_token.alloc()
        if row is None:
            raise OutOfKVError("no free request row")
        req.req_pool_idx = row
    try:
        slots = alloc_slots(req, n, pools, cache)
    except OutOfKVError:
        if took_row:
            pools.req_to_token.free(req.req_pool_idx)
            req.req_pool_idx = None
        raise
    start = req.kv_committed_len
    pools.req_to_token.req_to_token[req.req_pool_idx, start : start + n] = slots.to(pools.device)
    return slots


def free_kv_of(req: Req, cache: PrefixCache) -> None:
    """Hand the request's KV to the cache (kept as an evictable prefix) and its row back."""
    cache.cache_finished_req(req)
    req.req_pool_idx = None
    req.prefix_indices = torch.empty(0, dtype=torch.int64)
    req.last_node = None
    req.kv_committed_len = 0
