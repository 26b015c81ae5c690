"""Tensor parallelism over gloo on the CPU: TP=2 gives the same greedy tokens as TP=1 (fp32) on the
bundled model (9 heads, 3 KV heads: split 6+3 / 2+1), and as transformers on tiny Qwen2 (KV heads
split) and Qwen3 (one KV head, replicated on both ranks)."""

from __future__ import annotations

import random

import pytest

from radixserve import Engine
from tests.helpers import assert_pools_whole, hf_greedy, make_tiny_model

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):",
           "Once upon a time, in a land far away, there lived a dragon who"]
GREEDY = {"temperature": 0, "max_new_tokens": 12}


def test_bundled_model_tp2_equals_tp1():
    with Engine(dtype="float32", log_level="warning") as e1:
        want = [o["output_ids"] for o in e1.generate(PROMPTS, GREEDY)]
    with Engine(dtype="float32", tp_size=2, log_level="warning") as e2:
        got = [o["output_ids"] for o in e2.generate(PROMPTS, GREEDY)]
        again = e2.generate(PROMPTS, GREEDY)  # second pass through the radix cache on both ranks
        assert got == want
        assert [o["output_ids"] for o in again] == want
        assert all(o["meta_info"]["cached_tokens"] > 0 for o in again)
        assert_pools_whole(e2)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_tiny_models_tp2_match_transformers(arch, tmp_path):
    model = make_tiny_model(arch, str(tmp_path), seed=4)
    rng = random.Random(1)
    batch = [[rng.randrange(3, 49152) for _ in range(rng.randrange(3, 40))] for _ in range(6)]
    want = [hf_greedy(model, p, 12) for p in batch]
    traces = tmp_path / "traces"
    with Engine(model_path=str(tmp_path), dtype="float32", tp_size=2, page_size=2, log_level="warning") as e:
        e.start_profile(output_dir=str(traces), with_stack=False)  # profiled meanwhile, on both ranks
        outs = e.generate(input_ids=batch, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == want
        e.stop_profile()  # returns once both ranks' traces are written
        assert sorted(p.name.split("-", 1)[1] for p in traces.iterdir()) == \
            ["TP-0.trace.json.gz", "TP-1.trace.json.gz"]
        with pytest.raises(RuntimeError, match="no profile is running"):
            e.stop_profile()
        assert_pools_whole(e)
