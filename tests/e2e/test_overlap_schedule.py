"""Overlap scheduling (the default) gives the same outputs as --disable-overlap-schedule, and leaks nothing.

With overlap the scheduler launches batch N+1 before it has read batch N's tokens, so requests finish
one step late on the host, a finished request may ride along in one extra decode step, and sampling
that reads the generated tokens (penalties, grammars, min_new_tokens) waits for them. Every scenario
here runs on both engines and must agree token for token (and in logprobs) with the serial loop.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from radixserve import Engine
from tests.helpers import assert_pools_whole, make_tiny_model


def prompts(count: int, seed: int = 7, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 49152) for _ in range(6)]
    return [shared + [rng.randrange(3, 49152) for _ in range(rng.randrange(lo, hi))] for _ in range(count)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    make_tiny_model("llama", path, seed=11)
    return path


@pytest.fixture(scope="module")
def engines(model_dir):
    common = dict(model_path=model_dir, dtype="float32", chunked_prefill_size=32)
    with Engine(**common) as overlap, Engine(**common, disable_overlap_schedule=True) as serial:
        yield overlap, serial
        assert_pools_whole(overlap)
        assert_pools_whole(serial)


def run_both(engines, **kwargs):
    overlap, serial = engines
    got = overlap.generate(**kwargs)
    want = serial.generate(**kwargs)
    return got, want


def test_greedy_with_stops_at_every_step(engines):
    """Requests end on different steps (length, stop token, stop string), so finished requests are
    discovered one step late on many steps."""
    batch = prompts(12)
    _, serial = engines
    probe = serial.generate(input_ids=batch, sampling_params={"temperature": 0, "max_new_tokens": 16,
                                                              "ignore_eos": True})
    params = []
    for i, out in enumerate(probe):
        p = {"temperature": 0, "max_new_tokens": 1 + (i * 5) % 17}
        if i % 3 == 1:  # stop on a token the greedy output really produces, somewhere in the middle
            p["stop_token_ids"] = [out["output_ids"][min(i % 7 + 1, len(out["output_ids"]) - 1)]]
        if i % 3 == 2 and len(out["text"]) > 6:
            p["stop"] = [out["text"][3:6]]
        params.append(p)
    got, want = run_both(engines, input_ids=batch, sampling_params=params)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert [o["text"] for o in got] == [o["text"] for o in want]
    assert [o["meta_info"]["finish_reason"] for o in got] == [o["meta_info"]["finish_reason"] for o in want]
    assert any(o["meta_info"]["finish_reason"]["type"] == "stop" for o in got)


def test_seeded_sampling_and_logprobs(engines):
    batch = prompts(6, seed=8)
    params = {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 1234, "max_new_tokens": 12,
              "ignore_eos": True}
    got, want = run_both(engines, input_ids=batch, sampling_params=params, return_logprob=True,
                         top_logprobs_num=3, logprob_start_len=0)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    for g, w in zip(got, want):
        gl = [lp for lp, *_ in g["meta_info"]["output_token_logprobs"]]
        wl = [lp for lp, *_ in w["meta_info"]["output_token_logprobs"]]
        assert gl == pytest.approx(wl, abs=1e-4)
        assert len(g["meta_info"]["input_token_logprobs"]) == len(w["meta_info"]["input_token_logprobs"])


def test_penalties_and_min_tokens_wait_for_host_tokens(engines):
    """These read the generated tokens when sampling: the scheduler resolves before launching."""
    batch = prompts(5, seed=9)
    params = [
        {"temperature": 0, "max_new_tokens": 14, "frequency_penalty": 1.5},
        {"temperature": 0, "max_new_tokens": 14, "presence_penalty": 1.0, "repetition_penalty": 1.3},
        {"temperature": 0, "max_new_tokens": 10, "min_new_tokens": 6},
        {"temperature": 0, "max_new_tokens": 9},
        {"temperature": 0.7, "seed": 5, "max_new_tokens": 11, "repetition_penalty": 1.2},
    ]
    got, want = run_both(engines, input_ids=batch, sampling_params=params)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]


def test_chunked_prefill_beside_running_decodes(engines):
    """Long prompts are prefilled in chunks of 32 while shorter requests decode; arrivals are staggered."""
    overlap, serial = engines
    batch = prompts(6, seed=10, lo=60, hi=120) + prompts(4, seed=12)
    params = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}

    async def staggered(engine):
        async def one(i, ids):
            await asyncio.sleep(0.05 * i)
            return await engine.async_generate(input_ids=ids, sampling_params=params)
        return await asyncio.gather(*(one(i, ids) for i, ids in enumerate(batch)))

    got = asyncio.run(staggered(overlap))
    want = asyncio.run(staggered(serial))
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert overlap.get_scheduler_state().overlapped_launches > 0
    assert serial.get_scheduler_state().overlapped_launches == 0


def test_abort_while_in_flight_leaks_nothing(engines):
    overlap, _ = engines
    batch = prompts(8, seed=13)
    params = {"temperature": 0, "max_new_tokens": 400, "ignore_eos": True}

    async def scenario():
        tasks = [asyncio.ensure_future(overlap.async_generate(input_ids=ids, sampling_params=params))
                 for ids in batch[1:]]
        chunks = 0
        async for _ in await overlap.async_generate(input_ids=batch[0], sampling_params=params, stream=True):
            chunks += 1
            if chunks == 3:  # decoding is under way, with a batch in flight
                overlap.abort_request("")  # every request, wherever it is
        return chunks, await asyncio.gather(*tasks)

    chunks, outs = asyncio.run(scenario())
    assert chunks < 400
    assert all(o["meta_info"]["finish_reason"]["type"] == "abort" for o in outs)
    assert_pools_whole(overlap)


def test_retraction_under_overlap(model_dir, engines):
    _, serial = engines
    batch = prompts(24, seed=14)
    params = {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}
    want = [o["output_ids"] for o in serial.generate(input_ids=batch, sampling_params=params)]
    total_prompt = sum(len(p) for p in batch)
    with Engine(model_path=model_dir, dtype="float32", max_total_tokens=total_prompt // 2 + 64) as tight:
        got = [o["output_ids"] for o in tight.generate(input_ids=batch, sampling_params=params)]
        state = tight.get_scheduler_state()
        assert state.num_retractions > 0, "the pool was large enough: no retraction was exercised"
        assert state.overlapped_launches > 0
        assert got == want
        assert_pools_whole(tight)


def test_odd_page_and_chunk_sizes(model_dir, engines):
    """Pages of 3 slots and chunks of 17 tokens: partly filled pages continue across chunks and decode
    steps (the launch reads their last slot back) while batches overlap."""
    _, serial = engines
    batch = prompts(9, seed=15, lo=20, hi=70)
    params = [{"temperature": 0, "max_new_tokens": 6 + i, "ignore_eos": True} for i in range(len(batch))]
    want = [o["output_ids"] for o in serial.generate(input_ids=batch, sampling_params=params)]
    with Engine(model_path=model_dir, dtype="float32", page_size=3, chunked_prefill_size=17) as odd:
        got = [o["output_ids"] for o in odd.generate(input_ids=batch, sampling_params=params)]
        again = [o["output_ids"] for o in odd.generate(input_ids=batch, sampling_params=params)]  # cached
        assert got == want and again == want
        assert odd.get_scheduler_state().overlapped_launches > 0
        assert_pools_whole(odd)
