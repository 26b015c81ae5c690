"""Order of the waiting queue: longest cached prefix first (lpm) or first come, first served (fcfs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from radixserve.cache.base import PrefixCache
    from radixserve.scheduler.req import Req

# Above this many waiting requests, matching every prefix costs more than lpm gains: fall back to fcfs.
LPM_MAX_QUEUE = 128


def cacheable_len(req: Req) -> int:
    """How many leading tokens may come from the cache: at least one token must be computed to get
    logits, and prompt positions whose logprobs are wanted must be computed too."""
    n = req.seq_len - 1
    if req.wants_prompt_logprobs and not req.prompt_logprobs_done:
        n = min(n, max(req.logprob_start_len, 1) - 1)
    return max(n, 0)


def order_waiting(waiting: list[Req], policy: str, cache: PrefixCache, radix_enabled: bool) -> list[Req]:
    if policy == "fcfs" or not radix_enabled or len(waiting) > LPM_MAX_QUEUE:
        return list(waiting)
    lengths = {id(r): len(cache.match_prefix(r.fill_ids[: cacheable_len(r)]).indices) for r in waiting}
    # stable sort keeps arrival order among equal prefixes
    return sorted(waiting, key=lambda r: -lengths[id(r)])
