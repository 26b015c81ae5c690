"""Greedy parity with transformers (fp32) for tiny random Llama (llama3 rope), Qwen2, Qwen3, Mistral:
alone, in a mixed batch, with chunked prefill, with paged KV, and on a radix-cache hit."""

from __future__ import annotations

import random

import pytest

from radixserve import Engine
from tests.helpers import assert_pools_whole, hf_greedy, hf_logprobs, make_tiny_model

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
MAX_NEW = 12
VARIANTS = {
    "default": {},
    "chunked16": {"chunked_prefill_size": 16},
    "page4": {"page_size": 4},
}


def prompts(seed: int, count: int = 9) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(rng.randrange(3, 60))] for _ in range(count)]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    model = make_tiny_model(request.param, path, seed=ARCHS.index(request.param))
    batch = prompts(ARCHS.index(request.param))
    expected = [hf_greedy(model, p, MAX_NEW) for p in batch]
    return request.param, path, model, batch, expected


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_parity(tiny, variant):
    arch, path, model, batch, expected = tiny
    greedy = {"temperature": 0, "max_new_tokens": MAX_NEW}
    with Engine(model_path=path, dtype="float32", **VARIANTS[variant]) as engine:
        # each prompt alone
        for p, want in zip(batch[:3], expected[:3]):
            assert engine.generate(input_ids=p, sampling_params=greedy)["output_ids"] == want
        assert_pools_whole(engine)
        # one mixed-length batch
        outs = engine.generate(input_ids=batch, sampling_params=greedy)
        assert [o["output_ids"] for o in outs] == expected
        # the same batch again hits the radix cache
        again = engine.generate(input_ids=batch, sampling_params=greedy)
        assert [o["output_ids"] for o in again] == expected
        assert all(o["meta_info"]["cached_tokens"] > 0 for o in again if len(o["output_ids"]) > 0)
        assert_pools_whole(engine)


def test_logprobs_match_transformers(tiny):
    arch, path, model, batch, expected = tiny
    # max_logprobs -1: no cap, so that asking past the vocabulary (below) reaches the scheduler's clamp
    with Engine(model_path=path, dtype="float32", chunked_prefill_size=16, max_logprobs=-1) as engine:
        outs = engine.generate(
            input_ids=batch[:4], sampling_params={"temperature": 0, "max_new_tokens": MAX_NEW},
            return_logprob=True, logprob_start_len=0, top_logprobs_num=3,
        )
        for p, out in zip(batch[:4], outs):
            want_prompt, want_out = hf_logprobs(model, p, out["output_ids"])
            meta = out["meta_info"]
            got_out = [lp for lp, _, _ in meta["output_token_logprobs"]]
            assert got_out == pytest.approx(want_out, abs=1e-4)
            got_prompt = meta["input_token_logprobs"]
            assert got_prompt[0][0] is None and [t for _, t, _ in got_prompt] == p
            assert [lp for lp, _, _ in got_prompt[1:]] == pytest.approx(want_prompt, abs=1e-4)
            # the top-1 alternative of a greedy step is the chosen token
            assert [top[0][1] for top in meta["output_top_logprobs"]] == out["output_ids"]
        # scoring a prompt: no new tokens, but its logprobs (as evaluation harnesses ask)
        scored = engine.generate(input_ids=batch[0], sampling_params={"max_new_tokens": 0},
                                 return_logprob=True, logprob_start_len=0)
        want_prompt, _ = hf_logprobs(model, batch[0], [])
        assert scored["output_ids"] == [] and scored["meta_info"]["completion_tokens"] == 0
        assert scored["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
        got_prompt = scored["meta_info"]["input_token_logprobs"]
        assert got_prompt[0][0] is None and [t for _, t, _ in got_prompt] == batch[0]
        assert [lp for lp, _, _ in got_prompt[1:]] == pytest.approx(want_prompt, abs=1e-4)
        # a one-token prompt has one entry, the unscored first token
        one = engine.generate(input_ids=[17], sampling_params={"max_new_tokens": 1}, return_logprob=True,
                              logprob_start_len=0)
        assert [tuple(e) for e in one["meta_info"]["input_token_logprobs"]] == [(None, 17, None)]
        # more prompt alternatives than the vocabulary has: all of them, not a failure
        vocab = model.config.vocab_size
        wide = engine.generate(input_ids=batch[1][:2], sampling_params={"max_new_tokens": 1}, return_logprob=True,
                               logprob_start_len=0, top_logprobs_num=vocab + 5)
        assert [len(t) for t in wide["meta_info"]["input_top_logprobs"][1:]] == [vocab]
        assert_pools_whole(engine)
    # by default (max_logprobs 20, as vLLM) such a request is refused before it runs
    with Engine(model_path=path, dtype="float32") as capped:
        with pytest.raises(ValueError, match="top_logprobs_num must be at most 20"):
            capped.generate(input_ids=batch[1][:2], return_logprob=True, top_logprobs_num=21)
        assert_pools_whole(capped)


BIAS_CASES = {
    # transformers: attention_bias puts a bias on q, k, v and o; mlp_bias on gate, up and down
    "llama-attention-bias": ("llama", {"attention_bias": True}),
    "llama-mlp-bias": ("llama", {"mlp_bias": True}),
    "qwen3-attention-bias": ("qwen3", {"attention_bias": True}),
    # Qwen2 always has q/k/v biases (and no other), whatever its config says
    "qwen2-flag-false": ("qwen2", {"attention_bias": False}),
}


@pytest.mark.parametrize("case", list(BIAS_CASES))
def test_projection_biases_match_transformers(case, tmp_path):
    arch, overrides = BIAS_CASES[case]
    model = make_tiny_model(arch, str(tmp_path), seed=5, tokenizer=False, overrides=overrides, random_biases=True)
    assert any(n.endswith(".bias") for n, _ in model.named_parameters())
    batch = prompts(11, count=3)
    expected = [hf_greedy(model, p, 6) for p in batch]
    # paged, so the batch-1 and batched paths both run
    with Engine(model_path=str(tmp_path), dtype="float32", page_size=4) as engine:
        outs = engine.generate(input_ids=batch, sampling_params={"temperature": 0, "max_new_tokens": 6})
        assert [o["output_ids"] for o in outs] == expected
        assert engine.generate(input_ids=batch[0], sampling_params={"temperature": 0, "max_new_tokens": 6})[
            "output_ids"] == expected[0]
        assert_pools_whole(engine)
