"""Greedy parity with transformers (fp32) for tiny random Mixture-of-Experts models: Mixtral (top-2 of 8,
renormalised), Qwen2-MoE (top-3 of 6 not renormalised, a gated shared expert, a dense layer between
sparse ones) and Qwen3-MoE (q/k norms, top-2 of 8 renormalised). Alone, batched, chunked, paged, on a
radix-cache hit, with TP 2, and with expert parallelism 2 (each rank half the experts) over gloo."""

from __future__ import annotations

import random

import pytest

from radixserve import Engine
from tests.helpers import assert_pools_whole, hf_greedy, hf_logprobs, make_tiny_model

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]
MAX_NEW = 10
GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW}
VARIANTS = {
    "default": {},
    "chunked16-page4": {"chunked_prefill_size": 16, "page_size": 4},
}
PARALLEL = {
    "tp2": {"tp_size": 2},
    # experts 0..E/2-1 on rank 0, the rest on rank 1; dense layers whole on both ranks
    "tp2-ep2-dense1": {"tp_size": 2, "ep_size": 2, "moe_dense_tp_size": 1},
}


def prompts(seed: int, count: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(rng.randrange(3, 50))] for _ in range(count)]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    model = make_tiny_model(request.param, path, seed=20 + ARCHS.index(request.param), tokenizer=False)
    batch = prompts(ARCHS.index(request.param))
    expected = [hf_greedy(model, p, MAX_NEW) for p in batch]
    return path, model, batch, expected


def test_routing_spreads_over_the_experts(tiny):
    """The prompts reach every expert of every sparse layer, so parity below covers each one."""
    import torch

    _, model, batch, _ = tiny
    seen: dict[int, set[int]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None:
            continue

        def record(_mod, _inp, out, i=i):
            logits = out[0] if isinstance(out, tuple) else out
            seen.setdefault(i, set()).update(torch.topk(logits, model.config.num_experts_per_tok, -1)[1].flatten().tolist())

        hooks.append(gate.register_forward_hook(record))
    with torch.no_grad():
        for p in batch:
            model(torch.tensor([p]))
    for h in hooks:
        h.remove()
    experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    assert seen and all(len(ids) == experts for ids in seen.values()), seen


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_parity(tiny, variant):
    path, model, batch, expected = tiny
    with Engine(model_path=path, dtype="float32", log_level="warning", **VARIANTS[variant]) as engine:
        for p, want in zip(batch[:2], expected[:2]):
            assert engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"] == want
        outs = engine.generate(input_ids=batch, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == expected
        again = engine.generate(input_ids=batch, sampling_params=GREEDY)
        assert [o["output_ids"] for o in again] == expected
        assert all(o["meta_info"]["cached_tokens"] > 0 for o in again)
        if variant == "default":  # logprobs of prompt and output match too
            scored = engine.generate(input_ids=batch[:2], sampling_params=GREEDY, return_logprob=True,
                                     logprob_start_len=0)
            for p, out in zip(batch[:2], scored):
                want_prompt, want_out = hf_logprobs(model, p, out["output_ids"])
                meta = out["meta_info"]
                assert [lp for lp, _, _ in meta["output_token_logprobs"]] == pytest.approx(want_out, abs=1e-4)
                assert [lp for lp, _, _ in meta["input_token_logprobs"][1:]] == pytest.approx(want_prompt, abs=1e-4)
        assert_pools_whole(engine)


@pytest.mark.parametrize("parallel", list(PARALLEL))
def test_parallel_parity(tiny, parallel):
    path, _, batch, expected = tiny
    with Engine(model_path=path, dtype="float32", log_level="warning", page_size=2, **PARALLEL[parallel]) as engine:
        outs = engine.generate(input_ids=batch, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == expected
        assert engine.generate(input_ids=batch[3], sampling_params=GREEDY)["output_ids"] == expected[3]
        assert_pools_whole(engine)


# odd shapes, one Engine each (pages of 3, chunks of 7): Qwen2-MoE with no shared expert (transformers
# still saves a zero-wide one and its gate, skipped on load) and 3 heads of 20 over one KV head; Qwen3-MoE
# top-3 of 6 not renormalised (norm_topk_prob false) with 5 heads of 40 over one KV head
ODD = {
    "qwen2_moe": {"hidden_size": 60, "num_attention_heads": 3, "num_key_value_heads": 1,
                  "mlp_only_layers": [], "shared_expert_intermediate_size": 0, "moe_intermediate_size": 20,
                  "num_experts": 5, "norm_topk_prob": True},
    "qwen3_moe": {"hidden_size": 48, "num_attention_heads": 5, "num_key_value_heads": 1, "head_dim": 40,
                  "num_experts": 6, "num_experts_per_tok": 3, "moe_intermediate_size": 36, "norm_topk_prob": False},
}


@pytest.mark.parametrize("arch", list(ODD))
def test_odd_shapes_parity(arch, tmp_path):
    path = str(tmp_path)
    model = make_tiny_model(arch, path, seed=50, tokenizer=False, overrides=ODD[arch])
    batch = prompts(50, count=4)
    expected = [hf_greedy(model, p, MAX_NEW) for p in batch]
    with Engine(model_path=path, dtype="float32", log_level="warning", page_size=3, chunked_prefill_size=7) as engine:
        assert engine.generate(input_ids=batch[0], sampling_params=GREEDY)["output_ids"] == expected[0]
        outs = engine.generate(input_ids=batch, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == expected
        assert_pools_whole(engine)
