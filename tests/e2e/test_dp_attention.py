"""DP attention (--enable-dp-attention) over gloo on the CPU: --tp-size 2 --dp-size 2 is two processes,
two attention groups of one rank each (own requests, own KV cache), with the MoE layers and (without
--enable-dp-lm-head) the LM head split over both. Greedy tokens equal transformers' (fp32) for a batch
that gives both groups work, for one request alone (the other group joins each forward idle), for
prompt logprobs (the world LM head's one call per forward), chunked and paged; for Mixtral, Qwen2-MoE
(a shared expert over the world, a dense layer over the group), Qwen3-MoE (tied embeddings) and
DeepSeek-V3 (MLA, a dense first layer); with --enable-dp-lm-head, and with EP 2 (and
--moe-dense-tp-size 1). Then --tp-size 4 --dp-size 2: attention TP 2 in each group. Dense models are
refused in one line. Pools are whole after every scenario."""

from __future__ import annotations

import random

import pytest

from radixserve import Engine
from radixserve.engine import EngineStartError
from tests.e2e.test_deepseek_parity import built as built_deepseek
from tests.helpers import assert_pools_whole, hf_greedy, hf_logprobs, make_tiny_model

MAX_NEW = 8
GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW}
DP_ATTENTION = {"tp_size": 2, "dp_size": 2, "enable_dp_attention": True}


def prompts(seed: int, vocab: int, count: int = 6) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(3, 40))] for _ in range(count)]


_MODELS: dict[str, tuple] = {}


def tiny_moe(arch: str, tmp_path_factory) -> tuple:
    """(path, transformers model, prompts, expected tokens), made once per module run."""
    if arch not in _MODELS:
        path = str(tmp_path_factory.mktemp(arch))
        # Qwen3-MoE with tied embeddings: the LM head over the world is a separately loaded copy
        tied = {"tie_word_embeddings": True} if arch == "qwen3_moe" else None
        model = make_tiny_model(arch, path, seed=40 + len(_MODELS), tokenizer=False, overrides=tied)
        batch = prompts(len(_MODELS), 49152)
        _MODELS[arch] = (path, model, batch, [hf_greedy(model, p, MAX_NEW) for p in batch])
    return _MODELS[arch]


def check_parity(engine: Engine, batch: list[list[int]], expected: list[list[int]]) -> None:
    outs = engine.generate(input_ids=batch, sampling_params=GREEDY)
    assert [o["output_ids"] for o in outs] == expected
    # one request: the DP controller gives it to one group, the other joins every forward idle
    assert engine.generate(input_ids=batch[1], sampling_params=GREEDY)["output_ids"] == expected[1]
    state = engine.get_scheduler_state()
    assert len(state.per_dp) == 2 and all(s.kv_total > 0 for s in state.per_dp)


@pytest.mark.parametrize("arch, extra", [
    ("mixtral", {}),
    ("mixtral", {"enable_dp_lm_head": True, "chunked_prefill_size": 16, "page_size": 4}),
    ("qwen2_moe", {"page_size": 2}),
    ("qwen3_moe", {"ep_size": 2}),
])
def test_moe_greedy_parity(arch, extra, tmp_path_factory):
    path, model, batch, expected = tiny_moe(arch, tmp_path_factory)
    with Engine(model_path=path, dtype="float32", log_level="warning", **DP_ATTENTION, **extra) as engine:
        check_parity(engine, batch, expected)
        if arch == "mixtral" and not extra:  # prompt logprobs: logits rows beyond the last tokens
            scored = engine.generate(input_ids=batch[:3], sampling_params=GREEDY, return_logprob=True,
                                     logprob_start_len=0)
            for p, out in zip(batch[:3], scored):
                want_prompt, want_out = hf_logprobs(model, p, out["output_ids"])
                meta = out["meta_info"]
                assert [lp for lp, _, _ in meta["output_token_logprobs"]] == pytest.approx(want_out, abs=1e-4)
                assert [lp for lp, _, _ in meta["input_token_logprobs"][1:]] == pytest.approx(want_prompt, abs=1e-4)
        assert_pools_whole(engine)


@pytest.mark.parametrize("extra", [{}, {"enable_dp_lm_head": True, "ep_size": 2, "moe_dense_tp_size": 1}])
def test_deepseek_v3_greedy_parity(extra, tmp_path_factory):
    _, path, _, batch, expected = built_deepseek("v3", tmp_path_factory)
    with Engine(model_path=path, dtype="float32", log_level="warning", page_size=2, **DP_ATTENTION,
                **extra) as engine:
        check_parity(engine, batch, [e[:MAX_NEW] for e in expected])
        assert_pools_whole(engine)


def test_dense_models_are_refused_in_one_line(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    make_tiny_model("llama", path, seed=3, tokenizer=False)
    with pytest.raises(EngineStartError) as err:
        Engine(model_path=path, dtype="float32", log_level="warning", **DP_ATTENTION)
    message = str(err.value)
    assert message.startswith("--enable-dp-attention: built for MoE models only") and "\n" not in message


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_tp4_dp2_attention_tp2(arch, tmp_path_factory):
    """--tp-size 4 --dp-size 2: two groups of two ranks (attention, embedding and the dense layer split
    over each group's pair, requests broadcast and tokens sampled within it), MoE over all four."""
    if arch == "deepseek_v3":
        _, path, _, batch, expected = built_deepseek("v3", tmp_path_factory)
        expected = [e[:MAX_NEW] for e in expected]
    else:
        path, _, batch, expected = tiny_moe(arch, tmp_path_factory)
    with Engine(model_path=path, dtype="float32", log_level="warning", page_size=2, tp_size=4, dp_size=2,
                enable_dp_attention=True) as engine:
        check_parity(engine, batch, expected)
        assert_pools_whole(engine)
