"""A decode batch staged into a CUDA graph's static block (one copy; the request-table write and the
input gather run inside the graph) must compute what the eager path computes from the same rows, at
batch sizes that fill a bucket exactly and ones padded up to the next bucket, and the padding rows
must write nothing but the dummy row. Skipped without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def runner():
    from radixserve.bench.batch_driver import CONFIGS_DIR, build_runner
    from radixserve.server_args import ServerArgs

    sargs = ServerArgs(model_path=os.path.join(CONFIGS_DIR, "tiny-llama"), load_format="dummy",
                       dtype="float32", max_total_tokens=8192, max_running_requests=24, context_length=128,
                       cuda_graph_max_bs=16, page_size=4)
    return build_runner(sargs)


@pytest.mark.parametrize("bs", [1, 5, 9, 16])  # 9 and 16 share the bucket of 16: 7 padding rows, then none
def test_staged_decode_matches_eager(runner, bs):
    from radixserve.bench.batch_driver import BatchDriver
    from radixserve.model_executor.decode_inputs import eager_decode_batch
    from radixserve.scheduler.batch import build_decode_batch

    graphs = runner.graph_runner
    assert graphs is not None
    driver = BatchDriver(runner, seed=bs)
    driver.reset()
    reqs = driver.new_reqs(bs, 13, 8)  # 13 tokens: with pages of 4 the first decode continues a page
    driver.prefill(reqs)
    driver.decode(reqs)
    table = runner.pools.req_to_token.req_to_token
    dummy_row = table[0].clone()

    staged = build_decode_batch(reqs, runner, driver.cache)
    assert staged.graph_bucket == graphs.bucket(bs) and staged.batch_size == bs
    rows, seq_lens = [r.req_pool_idx for r in reqs], [r.seq_len for r in reqs]
    slots = staged.out_cache_loc.tolist()
    graph_logits = runner.forward(staged).next_token_logits.clone()
    torch.cuda.synchronize()
    # the table got each new slot at position seq_len - 1; padding touched only the dummy row
    assert table[torch.tensor(rows), torch.tensor(seq_lens) - 1].tolist() == slots
    assert torch.equal(table[0, 1:], dummy_row[1:])
    assert staged.input_ids.tolist() == runner.pools.last_token[torch.tensor(rows)].tolist()

    eager = eager_decode_batch(runner, rows, seq_lens, slots)  # same rows again: its writes are idempotent
    assert eager.graph_bucket is None
    eager_logits = runner.forward(eager).next_token_logits
    torch.testing.assert_close(graph_logits, eager_logits, atol=2e-4, rtol=2e-4)
    driver.reset()
