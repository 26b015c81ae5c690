"""The bundled SmolLM2-135M-Instruct: greedy parity with transformers (same GGUF, fp32), sampling
options, bad input, and pools whole after every scenario. One engine per configuration."""

from __future__ import annotations

import pytest
import torch

from radixserve import Engine
from tests.helpers import BUNDLED_GGUF, assert_pools_whole, bundled_dir, bundled_tokenizer, hf_greedy

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "Q: What is the boiling point of water in Celsius?\nA:",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a dragon who",
    "Translate to French: Good morning, how are you today? I hope the weather is nice where you live.",
    "List three primary colors:",
    "The quick brown fox",
]
MAX_NEW = 16
GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW}


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bundled_dir(), gguf_file=BUNDLED_GGUF, dtype=torch.float32)
    tok = bundled_tokenizer()
    return [hf_greedy(model.eval(), tok.encode(p), MAX_NEW) for p in PROMPTS]


@pytest.fixture(scope="module")
def engine():
    with Engine(dtype="float32") as e:
        yield e


def test_alone_batch_and_cache_hit(engine, reference):
    for prompt, want in zip(PROMPTS[:3], reference[:3]):
        assert engine.generate(prompt, GREEDY)["output_ids"] == want
    outs = engine.generate(PROMPTS, GREEDY)
    assert [o["output_ids"] for o in outs] == reference
    again = engine.generate(PROMPTS, GREEDY)
    assert [o["output_ids"] for o in again] == reference
    assert all(o["meta_info"]["cached_tokens"] > 0 for o in again)
    assert_pools_whole(engine)


@pytest.mark.parametrize("flags", [{"chunked_prefill_size": 16}, {"page_size": 4}], ids=["chunked16", "page4"])
def test_chunked_and_paged(flags, reference):
    with Engine(dtype="float32", **flags) as e:
        outs = e.generate(PROMPTS, GREEDY)
        assert [o["output_ids"] for o in outs] == reference
        again = e.generate(PROMPTS, GREEDY)
        assert [o["output_ids"] for o in again] == reference
        assert any(o["meta_info"]["cached_tokens"] > 0 for o in again)
        assert_pools_whole(e)


def test_seeded_sampling_reproduces(engine):
    params = {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 12, "seed": 1234}
    a = engine.generate(PROMPTS[5], params)["output_ids"]
    # the same seed inside a different batch gives the same tokens
    b = engine.generate([PROMPTS[0], PROMPTS[5]], [{"temperature": 1.0, "max_new_tokens": 5}, params])[1]
    assert a == b["output_ids"]
    assert_pools_whole(engine)


def test_top_k_one_is_greedy(engine, reference):
    out = engine.generate(PROMPTS[3], {"temperature": 0.8, "top_k": 1, "max_new_tokens": MAX_NEW})
    assert out["output_ids"] == reference[3]


def test_stop_string_trimmed(engine):
    out = engine.generate("1, 2, 3, 4,", {"temperature": 0, "max_new_tokens": 16, "stop": [", 7"]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ", 7"}
    assert out["text"] == " 5, 6"
    kept = engine.generate("1, 2, 3, 4,", {"temperature": 0, "max_new_tokens": 16, "stop": ", 7",
                                           "no_stop_trim": True})
    assert kept["text"].endswith(", 7")


def test_stop_token_ids_and_ignore_eos(engine):
    greedy = engine.generate(PROMPTS[2], {"temperature": 0, "max_new_tokens": 6})
    stop_at = greedy["output_ids"][2]
    out = engine.generate(PROMPTS[2], {"temperature": 0, "max_new_tokens": 6, "stop_token_ids": [stop_at]})
    assert out["output_ids"] == greedy["output_ids"][:3]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_at}
    long = engine.generate("Say hi.", {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True})
    assert long["meta_info"]["completion_tokens"] == 40


def test_n_returns_four(engine):
    outs = engine.generate(PROMPTS[1], {"temperature": 1.0, "max_new_tokens": 8, "n": 4, "seed": 7})
    assert isinstance(outs, list) and len(outs) == 4
    assert len({tuple(o["output_ids"]) for o in outs}) > 1
    assert_pools_whole(engine)


def test_streaming_is_cumulative_and_matches(engine, reference):
    chunks = list(engine.generate(PROMPTS[0], GREEDY, stream=True))
    assert len(chunks) > 1
    assert chunks[-1]["output_ids"] == reference[0]
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


def test_abandoned_stream_is_aborted(engine):
    stream = engine.generate(PROMPTS[5], {"temperature": 0, "max_new_tokens": 200, "ignore_eos": True},
                             stream=True)
    next(stream)
    stream.close()
    import time

    deadline = time.time() + 10
    while engine.get_scheduler_state().num_running and time.time() < deadline:
        time.sleep(0.1)
    assert_pools_whole(engine)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"prompt": "hello " * 9000}, "context length"),
        ({"sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"sampling_params": {"top_p": 1.5}}, "top_p"),
        ({"sampling_params": {"top_p": 0.0}}, "top_p"),
        ({"sampling_params": {"temperature": -0.5}}, "temperature"),
        ({"sampling_params": {"temprature": 0.5}}, "temprature"),
        ({"sampling_params": {"max_new_tokens": 10_000}}, "max_new_tokens"),
        ({"input_ids": [1, 2, 10**9]}, "input_ids"),
    ],
)
def test_bad_input_is_a_clear_error(engine, kwargs, field):
    kwargs = {"prompt": "Hi", **kwargs}
    if "input_ids" in kwargs:
        kwargs.pop("prompt")
    with pytest.raises(ValueError, match=field):
        engine.generate(**kwargs)
    # the engine keeps serving, and nothing leaked
    assert engine.generate("Hi", {"temperature": 0, "max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2
    assert_pools_whole(engine)
