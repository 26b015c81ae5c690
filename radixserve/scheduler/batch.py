"""Turn a list of requests into a ForwardBatch, allocating the KV slots of the new tokens.

Nothing here waits for the device: host data goes up in one non-blocking copy per batch, and a decode
batch reads its input tokens from the device (`ModelRunner.last_token`, written when the previous
batch sampled them), so it can be built while that batch is still running (overlap scheduling).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode
from radixserve.utils.transfer import upload_int64

if TYPE_CHECKING:
    from radixserve.cache.base import PrefixCache
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.scheduler.req import Req


class OutOfKVError(RuntimeError):
    """Not enough free KV slots even after evicting the whole unlocked cache."""


def last_slot_of(req: Req, runner: ModelRunner) -> int:
    """The slot of the request's newest committed position: kept on the host by the allocations
    below; read from req_to_token (a device read) only if something else moved it."""
    pos = req.kv_committed_len - 1
    if req.last_slot_pos == pos:
        return req.last_slot
    return int(runner.req_to_token_pool.req_to_token[req.req_pool_idx, pos])


def alloc_slots(req: Req, n: int, runner: ModelRunner, cache: PrefixCache) -> torch.Tensor:
    """Host slots for the next n tokens of req, evicting cached prefixes when the pool is short.
    The caller writes them into req_to_token."""
    start = req.kv_committed_len
    allocator = runner.allocator
    # only a partly filled last page needs its last slot; with pages of 1 there is none
    last_slot = last_slot_of(req, runner) if start % allocator.page_size else 0
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


def release_new_pages(reqs: list[Req], slots: list[torch.Tensor], runner: ModelRunner) -> None:
    """Undo alloc_slots for these requests: free the pages it took, not the partly filled last page
    each request already owned."""
    page = runner.allocator.page_size
    for req, req_slots in zip(reqs, slots):
        kept = min((-req.kv_committed_len) % page, req_slots.numel())  # slots in the owned page
        runner.allocator.free(req_slots[kept:])


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
        try:
            slots.append(alloc_slots(req, n, runner, cache))
        except OutOfKVError:
            release_new_pages(reqs[:i], slots, runner)  # not in req_to_token yet: nobody else frees them
            raise
        logits_indices.append(offset + n - 1)
        prompt_len = len(req.origin_input_ids)
        if req.wants_prompt_logprobs and req.stage.value == "prefilling" and not req.prompt_logprobs_done:
            lo = max(start, max(req.logprob_start_len, 1) - 1)
            hi = min(start + n, prompt_len - 1)
            if hi > lo:
                spans.append((i, offset + lo - start, offset + hi - start))
                any_prompt_logprobs = True
        next_ids.extend(fill[start + 1 : start + n + 1] + [-1] * max(0, start + n + 1 - len(fill)))
    seq_lens = [r.kv_committed_len + r.extend_len for r in reqs]
    uploads = [input_ids, positions, [r.req_pool_idx for r in reqs], seq_lens, logits_indices, torch.cat(slots)]
    if any_prompt_logprobs:
        uploads.append(next_ids)
    dev = upload_int64(uploads, device)
    out_cache_loc = dev[5]
    table = runner.req_to_token_pool.req_to_token
    offset = 0
    for req, req_slots in zip(reqs, slots):
        start, n = req.kv_committed_len, req_slots.numel()
        table[req.req_pool_idx, start : start + n] = out_cache_loc[offset : offset + n]
        offset += n
    return ForwardBatch(
        mode=ForwardMode.EXTEND,
        input_ids=dev[0],
        positions=dev[1],
        req_pool_indices=dev[2],
        seq_lens=dev[3],
        seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int64),
        out_cache_loc=out_cache_loc,
        req_to_token=table,
        kv_pool=runner.kv_pool,
        attn_backend=runner.attn_backend,
        extend_lens_cpu=torch.tensor([r.extend_len for r in reqs], dtype=torch.int64),
        prefix_lens_cpu=torch.tensor([r.kv_committed_len for r in reqs], dtype=torch.int64),
        logits_indices=dev[4],
        prompt_logprob_spans=spans,
        prompt_next_ids=dev[6] if any_prompt_logprobs else None,
    )


def alloc_decode_slots(reqs: list[Req], runner: ModelRunner, cache: PrefixCache) -> torch.Tensor:
    """Host slots, one per request, for a decode step (one vectorised allocation), evicting if short."""
    allocator = runner.allocator
    page = allocator.page_size
    prefix_lens = [r.kv_committed_len for r in reqs]
    # only requests continuing a partly filled page need their last slot; pages of 1 never do
    last_slots = [0] * len(reqs) if page == 1 else [
        last_slot_of(r, runner) if n % page else 0 for r, n in zip(reqs, prefix_lens)
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


def build_decode_batch(reqs: list[Req], runner: ModelRunner, cache: PrefixCache) -> ForwardBatch:
    """Each request's input is its newest token, read from runner.last_token on the device: the host
    may not have it yet (Req.pending)."""
    slots = alloc_decode_slots(reqs, runner, cache).tolist()
    return runner.decode_batch([r.req_pool_idx for r in reqs], [r.seq_len for r in reqs], slots)


def record_sampled(runner: ModelRunner, batch: ForwardBatch, next_ids: torch.Tensor) -> None:
    """Keep each request's newest token on the device, where its next decode batch reads it."""
    runner.last_token[batch.req_pool_indices] = next_ids
