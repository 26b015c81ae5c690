"""Turn a list of requests into a ForwardBatch, allocating the KV slots of the new tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from radixserve.cache.base import PrefixCache
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.scheduler.req import Req


class OutOfKVError(RuntimeError):
    """Not enough free KV slots even after evicting the whole unlocked cache."""


def alloc_slots(req: Req, n: int, runner: ModelRunner, cache: PrefixCache) -> torch.Tensor:
    """Slots for the next n tokens of req, evicting cached prefixes when the pool is short."""
    table = runner.req_to_token_pool.req_to_token
    start = req.kv_committed_len
    last_slot = int(table[req.req_pool_idx, start - 1]) if start > 0 else 0
    allocator = runner.allocator
    slots = allocator.alloc_for_sequence(start, last_slot, n)
    if slots is None:
        need = allocator.pages_needed(start, n) * allocator.page_size
        cache.evict(need - allocator.available_size())
        slots = allocator.alloc_for_sequence(start, last_slot, n)
        if slots is None:
            raise OutOfKVError(f"need {need} KV slots, {allocator.available_size()} free")
    table[req.req_pool_idx, start : start + n] = slots
    return slots


def build_extend_batch(reqs: list[Req], runner: ModelRunner, cache: PrefixCache) -> ForwardBatch:
    device = runner.device
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[torch.Tensor] = []
    logits_indices: list[int] = []
    spans: list[tuple[int, int, int]] = []
    next_ids: list[int] = []
    any_prompt_logprobs = False
    for i, req in enumerate(reqs):
        start, n = req.kv_committed_len, req.extend_len
        fill = req.fill_ids
        offset = len(input_ids)
        input_ids.extend(fill[start : start + n])
        positions.extend(range(start, start + n))
        slots.append(alloc_slots(req, n, runner, cache))
        logits_indices.append(offset + n - 1)
        prompt_len = len(req.origin_input_ids)
        if req.wants_prompt_logprobs and req.stage.value == "prefilling" and not req.prompt_logprobs_done:
            lo = max(start, max(req.logprob_start_len, 1) - 1)
            hi = min(start + n, prompt_len - 1)
            if hi > lo:
                spans.append((i, offset + lo - start, offset + hi - start))
                any_prompt_logprobs = True
        next_ids.extend(fill[start + 1 : start + n + 1] + [-1] * max(0, start + n + 1 - len(fill)))
    seq_lens = torch.tensor([r.kv_committed_len + r.extend_len for r in reqs], dtype=torch.int64)
    return ForwardBatch(
        mode=ForwardMode.EXTEND,
        input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        req_pool_indices=torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64, device=device),
        seq_lens=seq_lens.to(device),
        seq_lens_cpu=seq_lens,
        out_cache_loc=torch.cat(slots),
        req_to_token=runner.req_to_token_pool.req_to_token,
        kv_pool=runner.kv_pool,
        attn_backend=runner.attn_backend,
        extend_lens_cpu=torch.tensor([r.extend_len for r in reqs], dtype=torch.int64),
        prefix_lens_cpu=torch.tensor([r.kv_committed_len for r in reqs], dtype=torch.int64),
        logits_indices=torch.tensor(logits_indices, dtype=torch.int64, device=device),
        prompt_logprob_spans=spans,
        prompt_next_ids=torch.tensor(next_ids, dtype=torch.int64, device=device) if any_prompt_logprobs else None,
    )


def alloc_decode_slots(reqs: list[Req], runner: ModelRunner, cache: PrefixCache) -> torch.Tensor:
    """One slot per request for a decode step (one vectorised allocation), evicting if short."""
    table = runner.req_to_token_pool.req_to_token
    allocator = runner.allocator
    rows = torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64)
    starts = torch.tensor([r.kv_committed_len for r in reqs], dtype=torch.int64)
    prefix_lens = starts.tolist()
    if allocator.page_size == 1:
        last_slots = [0] * len(reqs)  # every token takes a fresh page: no need to read the table (a sync)
    else:
        last_slots = table[rows.to(table.device), (starts - 1).clamp(min=0).to(table.device)].tolist()
    slots = allocator.alloc_decode(prefix_lens, last_slots)
    if slots is None:
        need = sum(allocator.page_size for n in prefix_lens if n % allocator.page_size == 0)
        cache.evict(need - allocator.available_size())
        slots = allocator.alloc_decode(prefix_lens, last_slots)
        if slots is None:
            raise OutOfKVError(f"need {need} KV slots, {allocator.available_size()} free")
    table[rows.to(table.device), starts.to(table.device)] = slots.to(table.device)
    return slots


def build_decode_batch(reqs: list[Req], runner: ModelRunner, cache: PrefixCache) -> ForwardBatch:
    device = runner.device
    slots = alloc_decode_slots(reqs, runner, cache)
    seq_lens = torch.tensor([r.seq_len for r in reqs], dtype=torch.int64)
    return ForwardBatch(
        mode=ForwardMode.DECODE,
        input_ids=torch.tensor([r.output_ids[-1] for r in reqs], dtype=torch.int64, device=device),
        positions=(seq_lens - 1).to(device),
        req_pool_indices=torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64, device=device),
        seq_lens=seq_lens.to(device),
        seq_lens_cpu=seq_lens,
        out_cache_loc=slots.to(device),
        req_to_token=runner.req_to_token_pool.req_to_token,
        kv_pool=runner.kv_pool,
        attn_backend=runner.attn_backend,
    )
