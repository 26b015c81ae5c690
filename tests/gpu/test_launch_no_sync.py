"""Overlap scheduling only overlaps if launching a batch never waits for the GPU. Under
torch.cuda.set_sync_debug_mode("error") any host<->device synchronisation raises, so building,
running, sampling and starting the host copy of a decode step (graph replay and eager) and of a
prefill must all go through without one. Skipped without CUDA."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextlib.contextmanager
def no_sync():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("graphs", [True, False], ids=["cuda-graph", "eager"])
def test_launch_path_never_syncs(graphs, page_size):
    from radixserve.bench.batch_driver import CONFIGS_DIR, BatchDriver, build_runner
    from radixserve.sampling_batch import SamplingBatch
    from radixserve.scheduler.batch import build_decode_batch, build_extend_batch, record_sampled
    from radixserve.scheduler.inflight import InFlightBatch
    from radixserve.server_args import ServerArgs

    sargs = ServerArgs(model_path=os.path.join(CONFIGS_DIR, "tiny-llama"), load_format="dummy",
                       dtype="bfloat16", max_total_tokens=4096, max_running_requests=8, context_length=256,
                       disable_cuda_graph=not graphs, cuda_graph_max_bs=8, page_size=page_size)
    runner = build_runner(sargs)
    driver = BatchDriver(runner, seed=0)
    reqs = driver.new_reqs(4, 30, 8)  # 30 tokens: with pages of 4 the decode steps continue a page

    def launch(batch, reqs):
        out = runner.forward(batch)
        params = SamplingBatch.build([r.params for r in reqs], [r.output_ids for r in reqs],
                                     [r.origin_input_ids for r in reqs], [[]] * len(reqs), [None] * len(reqs),
                                     runner.vocab_size, runner.device)
        sampled = driver.sampler(out.next_token_logits, params, return_logprob=True, max_top_k=2)
        record_sampled(runner, batch, sampled.next_token_ids)
        return InFlightBatch.start_copy(reqs, sampled)

    with torch.inference_mode():
        with no_sync():
            inflight = launch(build_extend_batch(reqs, runner, driver.cache), reqs)
        for r, t in zip(reqs, inflight.wait().next_token_ids.tolist()):
            r.kv_committed_len += r.extend_len
            r.output_ids.append(t)
        for _ in range(3):
            with no_sync():
                inflight = launch(build_decode_batch(reqs, runner, driver.cache), reqs)
            for r, t in zip(reqs, inflight.wait().next_token_ids.tolist()):
                r.kv_committed_len += 1
                r.output_ids.append(t)
    assert all(len(r.output_ids) == 4 for r in reqs)
