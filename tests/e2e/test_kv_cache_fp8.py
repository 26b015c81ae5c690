"""--kv-cache-dtype fp8_e4m3 end to end on CPU (torch_native attention over an e4m3 pool): a tiny random
Llama alone, batched, chunked and paged, and on radix-cache hits; the pool's bytes per token; and the
bundled SmolLM2-135M's greedy tokens against the same model with the model-dtype (fp32) KV cache."""

from __future__ import annotations

import random

import pytest

from radixserve import Engine
from tests.helpers import assert_pools_whole, make_tiny_model

MAX_NEW = 12
GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW}
# the tiny Llama (tests/helpers.tiny_config): 2 layers, 2 KV heads of 16 dims
TINY_KV_ELEMENTS_PER_TOKEN = 2 * 2 * 2 * 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, list[list[int]]]:
    path = str(tmp_path_factory.mktemp("llama"))
    make_tiny_model("llama", path, seed=21, tokenizer=False)
    rng = random.Random(21)
    # lengths past one chunk (16) and one page (4), and two that share a 30-token prefix
    prompts = [[rng.randrange(3, 49152) for _ in range(rng.randrange(5, 60))] for _ in range(5)]
    prompts.append(prompts[-1][:30] + [rng.randrange(3, 49152) for _ in range(9)])
    return path, prompts


def run_scenarios(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    """Alone, batched, and the batch again on the radix cache; each the same tokens."""
    alone = [engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"] for p in prompts[:2]]
    assert_pools_whole(engine)
    outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    batched = [o["output_ids"] for o in outs]
    assert all(len(ids) == MAX_NEW for ids in batched), batched
    assert batched[:2] == alone
    again = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert all(o["meta_info"]["cached_tokens"] > 0 for o in again)
    assert [o["output_ids"] for o in again] == batched
    assert_pools_whole(engine)
    return batched


def test_tiny_model_alone_batched_chunked_paged_and_cached(tiny):
    path, prompts = tiny
    with Engine(model_path=path, dtype="float32", kv_cache_dtype="fp8_e4m3") as engine:
        assert engine.info["kv_dtype"] == "float8_e4m3fn" and engine.info["dtype"] == "float32"
        assert engine.info["kv_bytes_per_token"] == TINY_KV_ELEMENTS_PER_TOKEN  # one byte an element
        plain = run_scenarios(engine, prompts)
    with Engine(model_path=path, dtype="float32", kv_cache_dtype="fp8_e4m3", chunked_prefill_size=16,
                page_size=4) as engine:
        chunked_paged = run_scenarios(engine, prompts)
    # chunks after the first read the earlier ones from the pool, as the unchunked prefill reads its own
    # new tokens: the same numbers either way
    assert chunked_paged == plain
    with Engine(model_path=path, dtype="float32") as engine:
        assert engine.info["kv_dtype"] == "float32"
        assert engine.info["kv_bytes_per_token"] == 4 * TINY_KV_ELEMENTS_PER_TOKEN


BUNDLED_PROMPTS = [
    "The capital of France is",
    "1, 2, 3, 4,",
    "Q: What is the boiling point of water in Celsius?\nA:",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a dragon who",
]
BUNDLED_NEW = 16


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions (the first BUNDLED_NEW tokens of each prompt) holding the same token."""
    same = sum(x == y for ia, ib in zip(a, b) for x, y in zip(ia[:BUNDLED_NEW], ib[:BUNDLED_NEW]))
    return same / (len(a) * BUNDLED_NEW)


def test_bundled_model_agrees_with_the_model_dtype_cache():
    greedy = {"temperature": 0, "max_new_tokens": BUNDLED_NEW, "ignore_eos": True}
    with Engine(dtype="float32") as engine:
        want = [o["output_ids"] for o in engine.generate(BUNDLED_PROMPTS, greedy)]
        fp32_bytes = engine.info["kv_bytes_per_token"]
    with Engine(dtype="float32", kv_cache_dtype="fp8_e4m3") as engine:
        assert engine.info["kv_bytes_per_token"] * 4 == fp32_bytes  # and half of a bf16 cache's
        outs = engine.generate(BUNDLED_PROMPTS, greedy)
        got = [o["output_ids"] for o in outs]
        again = [o["output_ids"] for o in engine.generate(BUNDLED_PROMPTS, greedy)]
        assert again == got
        assert_pools_whole(engine)
    rate = agreement(got, want)
    print(f"fp8 KV vs fp32 KV, greedy agreement over the first {BUNDLED_NEW} tokens: {rate:.1%} "
          f"(per prompt: {[agreement([g], [w]) for g, w in zip(got, want)]})")
    assert rate >= 0.6, (rate, got, want)
    assert "Paris" in outs[0]["text"], outs[0]["text"]
    assert "5, 6" in outs[1]["text"], outs[1]["text"]
