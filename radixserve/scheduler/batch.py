"""Turn a list of requests into a ForwardBatch, allocating the KV slots of the new tokens.

Nothing here waits for the device: host data goes up in one non-blocking copy per batch, and a decode
batch reads its input tokens from the device (`MemoryPools.last_token`, written when the previous
batch sampled them), so it can be built while that batch is still running (overlap scheduling).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode
from radixserve.scheduler.kv import OutOfKVError, alloc_decode_slots, alloc_slots, release_new_pages
from radixserve.scheduler.state import ReqState
from radixserve.utils.transfer import upload_int64

if TYPE_CHECKING:
    from radixserve.cache.base import PrefixCache
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.scheduler.req import Req


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
            slots.append(alloc_slots(req, n, runner.pools, cache))
        except OutOfKVError:
            release_new_pages(reqs[:i], slots, runner.pools)  # not in req_to_token yet: nobody else frees them
            raise
        logits_indices.append(offset + n - 1)
        prompt_len = len(req.origin_input_ids)
        if req.wants_prompt_logprobs and req.state is ReqState.PREFILLING and not req.prompt_logprobs_done:
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
    table = runner.pools.req_to_token.req_to_token
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
        kv_pool=runner.pools.kv,
        attn_backend=runner.attn_backend,
        extend_lens_cpu=torch.tensor([r.extend_len for r in reqs], dtype=torch.int64),
        prefix_lens_cpu=torch.tensor([r.kv_committed_len for r in reqs], dtype=torch.int64),
        logits_indices=dev[4],
        prompt_logprob_spans=spans,
        prompt_next_ids=dev[6] if any_prompt_logprobs else None,
    )


def build_decode_batch(reqs: list[Req], runner: ModelRunner, cache: PrefixCache) -> ForwardBatch:
    """Each request's input is its newest token, read from the pools' last_token on the device: the host
    may not have it yet (Req.pending)."""
    slots = alloc_decode_slots(reqs, runner.pools, cache).tolist()
    return runner.decode_batch([r.req_pool_idx for r in reqs], [r.seq_len for r in reqs], slots)


def record_sampled(runner: ModelRunner, batch: ForwardBatch, next_ids: torch.Tensor) -> None:
    """Keep each request's newest token on the device, where its next decode batch reads it."""
    runner.pools.set_last_tokens(batch.req_pool_indices, next_ids)
