"""The KV memory apart from the model runner: one MemoryPools shared by the runner, the scheduler and
the cache; the pool's layout by bytes; a request's KV taken and given back outside batch building;
a request's first token written from outside the sampler."""

from __future__ import annotations

import pytest
import torch

from radixserve.cache.chunk import ChunkCache
from radixserve.cache.memory import MemoryPools
from radixserve.cache.radix import RadixCache
from radixserve.messages import GenerateReq
from radixserve.sampling_params import SamplingParams
from radixserve.scheduler.kv import OutOfKVError, allocate, free_kv_of
from radixserve.scheduler.req import Req

LAYERS, KV_HEADS, HEAD_DIM = 3, 2, 8


def pools(tokens: int = 64, page_size: int = 4, rows: int = 4) -> MemoryPools:
    return MemoryPools.create(tokens, rows, 128, page_size, LAYERS, KV_HEADS, HEAD_DIM, torch.float16,
                              torch.device("cpu"))


def request(rid: str, prompt_len: int) -> Req:
    return Req(GenerateReq(rid, list(range(1, prompt_len + 1)), SamplingParams()), eos_ids={0}, max_new_tokens=4)


def test_layout_addresses_every_layer_buffer_by_bytes():
    p = pools()
    layout = p.kv.layout()
    assert [(b.layer, b.kind) for b in layout] == [(i, k) for i in range(LAYERS) for k in ("k", "v")]
    per_slot = KV_HEADS * HEAD_DIM * 2  # float16
    assert all(b.bytes_per_slot == per_slot for b in layout)
    assert sum(b.bytes_per_slot for b in layout) == p.kv.bytes_per_token()
    assert p.kv.bytes_per_page() == p.kv.bytes_per_token() * 4
    k0 = layout[0]
    offset, length = k0.span(8, 4)  # the page of slots 8..11
    assert (offset, length) == (8 * per_slot, 4 * per_slot)
    # the bytes it names are those slots' rows of the layer's K buffer
    k0.tensor[8:12] = 1.5
    raw = k0.tensor.view(torch.uint8).flatten()[offset : offset + length]
    assert torch.equal(raw, k0.tensor[8:12].contiguous().view(torch.uint8).flatten())


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("cache_cls", [RadixCache, ChunkCache])
def test_allocate_outside_a_batch_and_give_it_back(page_size, cache_cls):
    p = pools(page_size=page_size)
    cache = cache_cls(p.req_to_token, p.allocator, page_size)
    req = request("a", 10)
    slots = allocate(req, 10, p, cache)
    assert req.req_pool_idx is not None and slots.numel() == 10 and len(set(slots.tolist())) == 10
    assert torch.equal(p.req_to_token.req_to_token[req.req_pool_idx, :10], slots)
    assert p.allocator.available_size() == 64 - (10 + page_size - 1) // page_size * page_size
    req.kv_committed_len = 10  # the KV arrived
    # its first token, written from outside the sampler, is what its first decode step reads
    p.set_last_tokens(torch.tensor([req.req_pool_idx]), torch.tensor([42]))
    assert int(p.last_token[req.req_pool_idx]) == 42
    free_kv_of(req, cache)
    cache.evict(1 << 30)
    assert p.allocator.available_size() == 64 and p.req_to_token.available_size() == 4


def test_allocate_that_cannot_fit_takes_nothing():
    p = pools(tokens=16, page_size=4)
    cache = RadixCache(p.req_to_token, p.allocator, 4)
    req = request("big", 40)
    with pytest.raises(OutOfKVError):
        allocate(req, 40, p, cache)
    assert req.req_pool_idx is None
    assert p.allocator.available_size() == 16 and p.req_to_token.available_size() == 4
    rows = [allocate(request(str(i), 1), 1, p, cache) for i in range(4)]
    assert len(rows) == 4
    with pytest.raises(OutOfKVError, match="request row"):  # four rows, all taken
        allocate(request("late", 1), 1, p, cache)
