"""Make room for one decode step: retract requests (back to the waiting queue) when KV runs short."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixserve.scheduler.req import Req, ReqStage

if TYPE_CHECKING:
    from radixserve.cache.base import PrefixCache
    from radixserve.model_executor.model_runner import ModelRunner


def decode_tokens_needed(reqs: list[Req], page_size: int) -> int:
    # each request writes the KV of its last token at position kv_committed_len
    return sum(page_size for r in reqs if r.kv_committed_len % page_size == 0)


def free_kv_of(req: Req, cache: PrefixCache) -> None:
    """Hand the request's KV to the cache (kept as an evictable prefix) and its row back."""
    cache.cache_finished_req(req)
    req.req_pool_idx = None
    req.prefix_indices = torch.empty(0, dtype=torch.int64)
    req.last_node = None
    req.kv_committed_len = 0


def retract_for_decode(running: list[Req], runner: ModelRunner, cache: PrefixCache) -> list[Req]:
    """Retract requests until one decode step of the rest fits. Returns the retracted ones, which keep
    their generated tokens and will be prefilled again."""
    page = runner.allocator.page_size
    retracted: list[Req] = []

    def short() -> bool:
        free = runner.allocator.available_size() + cache.evictable_size()
        return decode_tokens_needed(running, page) > free

    if not short():
        return retracted
    # retract the requests that lose least: fewest generated tokens, then longest prompts
    running.sort(key=lambda r: (len(r.output_ids), -len(r.origin_input_ids)), reverse=True)
    while short() and len(running) > 1:
        victim = running.pop()
        free_kv_of(victim, cache)
        victim.stage = ReqStage.WAITING
        retracted.append(victim)
    return retracted
