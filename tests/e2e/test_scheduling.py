"""Scheduler behaviour under memory pressure and concurrency, on a tiny random Llama."""

from __future__ import annotations

import asyncio
import glob
import os
import random
import tempfile

import pytest

from radixserve import Engine
from tests.helpers import assert_pools_whole, make_tiny_model

MAX_NEW = 24


def prompts(count: int) -> list[list[int]]:
    rng = random.Random(42)
    shared = [rng.randrange(3, 49152) for _ in range(8)]  # a common prefix, as chat traffic has
    return [shared + [rng.randrange(3, 49152) for _ in range(rng.randrange(4, 40))] for _ in range(count)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    make_tiny_model("llama", path, seed=3)
    return path


@pytest.fixture(scope="module")
def ample(model_dir):
    with Engine(model_path=model_dir, dtype="float32") as e:
        yield e


def test_retraction_keeps_greedy_outputs(model_dir, ample):
    batch = prompts(32)
    params = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
    want = [o["output_ids"] for o in ample.generate(input_ids=batch, sampling_params=params)]
    # room for the prompts but not for every request's full output at once
    total_prompt = sum(len(p) for p in batch)
    with Engine(model_path=model_dir, dtype="float32", max_total_tokens=total_prompt // 2 + 64,
                page_size=2) as tight:
        got = [o["output_ids"] for o in tight.generate(input_ids=batch, sampling_params=params)]
        state = tight.get_scheduler_state()
        assert state.num_retractions > 0, "the pool was large enough: no retraction was exercised"
        assert got == want
        assert_pools_whole(tight)


def test_fcfs_and_no_radix_cache_agree(model_dir, ample):
    batch = prompts(10)
    params = {"temperature": 0, "max_new_tokens": 8}
    want = [o["output_ids"] for o in ample.generate(input_ids=batch, sampling_params=params)]
    socket_dirs = os.path.join(tempfile.gettempdir(), "radixserve-*")
    before = set(glob.glob(socket_dirs))
    with Engine(model_path=model_dir, dtype="float32", schedule_policy="fcfs", disable_radix_cache=True,
                max_running_requests=3, max_prefill_tokens=64) as e:
        outs = e.generate(input_ids=batch, sampling_params=params)
        assert [o["output_ids"] for o in outs] == want
        assert all(o["meta_info"]["cached_tokens"] == 0 for o in outs)
        assert_pools_whole(e)
        assert set(glob.glob(socket_dirs)) - before, "the engine's ipc socket folder was not made where expected"
    assert set(glob.glob(socket_dirs)) <= before, "shutdown left the engine's ipc socket folder behind"


def test_async_generate_concurrent_and_abort(ample):
    batch = prompts(6)

    async def run():
        results = await asyncio.gather(*(
            ample.async_generate(input_ids=p, sampling_params={"temperature": 0, "max_new_tokens": 6})
            for p in batch
        ))
        stream = await ample.async_generate(
            input_ids=batch[0], sampling_params={"temperature": 0, "max_new_tokens": 400, "ignore_eos": True},
            stream=True,
        )
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()
        return results

    results = asyncio.run(run())
    assert all(r["meta_info"]["completion_tokens"] == 6 for r in results)
    for _ in range(100):
        if ample.get_scheduler_state().num_running == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert_pools_whole(ample)


def test_abort_by_rid_while_waiting_and_running(ample):
    import threading

    outs: list = []
    t = threading.Thread(target=lambda: outs.append(ample.generate(
        input_ids=prompts(1)[0], sampling_params={"temperature": 0, "max_new_tokens": 400, "ignore_eos": True})))
    t.start()
    for _ in range(100):
        if ample.get_scheduler_state().num_running:
            break
        asyncio.run(asyncio.sleep(0.02))
    ample.abort_request("")
    t.join(timeout=30)
    assert outs and outs[0]["meta_info"]["finish_reason"]["type"] == "abort"
    assert_pools_whole(ample)


@pytest.mark.parametrize("page_size", [1, 3])
def test_admitting_a_cached_prefix_does_not_overcommit_the_pool(model_dir, ample, page_size):
    """The cached prefix a request reuses counts as free room only until the request locks it. A pool
    that holds a cached 100-token prompt, then its 2-token continuation and a fresh 70-token prompt,
    fits both requests one after the other but not together: the second must wait, not be aborted
    for want of KV, and no slot may leak."""
    rng = random.Random(7)
    prefix = [rng.randrange(3, 49152) for _ in range(100)]
    later = [prefix + [rng.randrange(3, 49152) for _ in range(2)], [rng.randrange(3, 49152) for _ in range(70)]]
    params = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
    want = [o["output_ids"] for o in ample.generate(input_ids=[prefix, *later], sampling_params=params)]
    with Engine(model_path=model_dir, dtype="float32", max_total_tokens=160 + page_size, page_size=page_size,
                disable_overlap_schedule=True) as tight:
        first = tight.generate(input_ids=prefix, sampling_params=params)
        outs = tight.generate(input_ids=later, sampling_params=params)
        assert [o["meta_info"]["finish_reason"]["type"] for o in outs] == ["length", "length"]
        assert [first["output_ids"]] + [o["output_ids"] for o in outs] == want
        assert outs[0]["meta_info"]["cached_tokens"] >= 99  # the prefix was reused, not recomputed
        assert_pools_whole(tight)
