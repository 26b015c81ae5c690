"""Pick the requests of the next prefill batch within the token, row and KV budgets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from radixserve.scheduler.output_estimate import DEFAULT_CLIP_MAX_NEW_TOKENS, clip_from_env
from radixserve.scheduler.policy import cacheable_len
from radixserve.scheduler.req import Req
from radixserve.scheduler.state import ReqState, move

if TYPE_CHECKING:
    from radixserve.cache.allocator import KVAllocator
    from radixserve.cache.base import PrefixCache
    from radixserve.cache.pools import ReqToTokenPool


@dataclass
class PrefillPlan:
    reqs: list[Req] = field(default_factory=list)
    chunked_req: Req | None = None  # the request whose prompt continues in a later batch
    new_tokens: int = 0
    cached_tokens: int = 0


def reserved_tokens(req: Req, ratio: float, clip: int = DEFAULT_CLIP_MAX_NEW_TOKENS) -> int:
    return int(min(req.remaining_new_tokens(), clip) * ratio)


class PrefillPlanner:
    def __init__(
        self,
        cache: PrefixCache,
        allocator: KVAllocator,
        req_pool: ReqToTokenPool,
        chunked_prefill_size: int,
        max_prefill_tokens: int,
        max_running_requests: int,
        page_size: int,
    ) -> None:
        self.cache = cache
        self.allocator = allocator
        self.req_pool = req_pool
        self.chunk_size = chunked_prefill_size if chunked_prefill_size > 0 else None
        self.max_prefill_tokens = max_prefill_tokens
        self.max_running = max_running_requests
        self.page_size = page_size
        self.clip = clip_from_env()

    def plan(self, waiting: list[Req], running: list[Req], chunked: Req | None, ratio: float) -> PrefillPlan:
        plan = PrefillPlan()
        reserved = sum(reserved_tokens(r, ratio, self.clip) for r in running)
        spent = 0  # KV promised to the requests of this plan

        def kv_room() -> int:
            # read afresh each time: admitting a request locks its cached prefix, which takes those
            # tokens out of the evictable part of the pool
            return self.allocator.available_size() + self.cache.evictable_size() - reserved - spent

        budget_input = self.max_prefill_tokens
        budget_chunk = self.chunk_size if self.chunk_size is not None else 1 << 62

        if chunked is not None:
            n = min(chunked.seq_len - chunked.kv_committed_len, budget_chunk)
            room = kv_room() - self.page_size
            if n > room and running:
                # the running requests hold the rest: continue with what fits, or after they free some
                if room <= 0:
                    return plan
                n = room
            chunked.extend_len = n
            plan.reqs.append(chunked)
            plan.new_tokens += n
            if chunked.kv_committed_len + n < chunked.seq_len:
                plan.chunked_req = chunked
                return plan
            spent += n + self.page_size + reserved_tokens(chunked, ratio, self.clip)
            budget_input -= n
            budget_chunk -= n

        for req in waiting:
            if len(running) + len(plan.reqs) >= self.max_running or self.req_pool.available_size() == 0:
                break
            if budget_chunk <= 0 or budget_input <= 0:
                break
            match = self.cache.match_prefix(req.fill_ids[: cacheable_len(req)])
            extend = req.seq_len - len(match.indices)
            # round the page a request would partly fill up to a whole page, and keep room for
            # (an estimate of) its output
            need = extend + self.page_size + reserved_tokens(req, ratio, self.clip)
            if running or plan.reqs or chunked is not None:
                need_now = need
            else:
                # alone, a request needs only its prompt's pages: its output fits the pool (the
                # scheduler clips max_new_tokens to it) and nobody else's room is at stake. Without
                # this a request whose output estimate exceeds the pool would wait forever.
                need_now = self.allocator.pages_needed(len(match.indices), extend) * self.page_size
            if need_now > kv_room():
                break
            if extend > budget_input and plan.reqs:
                break
            self.cache.inc_lock_ref(match.last_node)
            if need_now > kv_room():  # its prefix was evictable, and counted as room, until locked
                self.cache.dec_lock_ref(match.last_node)
                break
            self._admit(req, match)
            if extend > budget_chunk:
                req.extend_len = budget_chunk
                plan.reqs.append(req)
                plan.chunked_req = req
                plan.new_tokens += budget_chunk
                plan.cached_tokens += len(match.indices)
                break
            req.extend_len = extend
            plan.reqs.append(req)
            plan.new_tokens += extend
            plan.cached_tokens += len(match.indices)
            spent += need
            budget_input -= extend
            budget_chunk -= extend
        return plan

    def _admit(self, req: Req, match) -> None:
        row = self.req_pool.alloc()
        assert row is not None
        req.req_pool_idx = row
        req.prefix_indices = match.indices
        req.last_node = match.last_node  # locked by the caller
        n = len(match.indices)
        if n:
            self.req_pool.req_to_token[row, :n] = match.indices
        req.kv_committed_len = n
        if not req.admitted_once:
            req.cached_tokens = n
            req.admitted_once = True
        move(req, ReqState.PREFILLING)
