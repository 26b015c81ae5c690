"""The batch builders keep each request's newest slot on the host, so continuing a partly filled page
(--page-size > 1) needs no read of req_to_token; the host copy must always match the table."""

from __future__ import annotations

import os

import pytest
import torch

from radixserve.bench.batch_driver import CONFIGS_DIR, BatchDriver, build_runner
from radixserve.scheduler.kv import last_slot_of
from radixserve.server_args import ServerArgs


@pytest.mark.parametrize("page_size", [1, 3])
def test_host_last_slot_matches_the_table(page_size):
    sargs = ServerArgs(model_path=os.path.join(CONFIGS_DIR, "tiny-llama"), load_format="dummy", dtype="float32",
                       device="cpu", max_total_tokens=512, max_running_requests=4, context_length=64,
                       page_size=page_size)
    runner = build_runner(sargs)
    driver = BatchDriver(runner, seed=0)
    table = runner.pools.req_to_token.req_to_token
    reqs = driver.new_reqs(3, 7, 9)
    with torch.inference_mode():
        driver.prefill(reqs)
        for step in range(8):
            for r in reqs:
                pos = r.kv_committed_len - 1
                if page_size > 1 or step == 0:  # pages of 1 never need it: decode does not keep it
                    assert r.last_slot_pos == pos
                    assert r.last_slot == int(table[r.req_pool_idx, pos])
                slots = table[r.req_pool_idx, : r.kv_committed_len]
                assert len(set(slots.tolist())) == r.kv_committed_len  # no slot handed out twice
                if page_size > 1:  # positions of one page sit in one page, in order
                    pages = slots // page_size
                    assert torch.equal(pages[::page_size].repeat_interleave(page_size)[: len(pages)], pages)
            if step < 7:
                driver.decode(reqs)
    # a stale host copy (something else moved the row) falls back to reading the table
    r = reqs[0]
    r.last_slot_pos = -1
    assert last_slot_of(r, runner.pools) == int(table[r.req_pool_idx, r.kv_committed_len - 1])
    driver.reset()


def test_failed_extend_allocation_gives_back_the_pages_it_took():
    """When a later request of a prefill batch cannot get KV, the pages already taken for earlier ones
    (not yet in req_to_token, so nothing else would free them) go back; a page the request already
    owned stays its own."""
    from radixserve.scheduler.batch import build_extend_batch
    from radixserve.scheduler.kv import OutOfKVError

    sargs = ServerArgs(model_path=os.path.join(CONFIGS_DIR, "tiny-llama"), load_format="dummy", dtype="float32",
                       device="cpu", max_total_tokens=30, max_running_requests=2, context_length=64, page_size=3)
    runner = build_runner(sargs)
    driver = BatchDriver(runner, seed=0)
    alloc = runner.pools.allocator
    a, b = driver.new_reqs(2, 40, 4)
    a.extend_len = 4  # two pages, the second partly filled
    with torch.inference_mode():
        build_extend_batch([a], runner, driver.cache)
    a.kv_committed_len = 4
    free_before = alloc.available_size()
    owned = set(runner.pools.req_to_token.req_to_token[a.req_pool_idx, :4].tolist())
    a.extend_len, b.extend_len = 5, 30  # a: 2 slots in its own page + one new page; b cannot fit
    with pytest.raises(OutOfKVError), torch.inference_mode():
        build_extend_batch([a, b], runner, driver.cache)
    assert alloc.available_size() == free_before
    free_pages = set(alloc.free_page_ids().tolist())
    assert not {s // 3 for s in owned} & free_pages  # a's own pages were not freed
    driver.reset()
