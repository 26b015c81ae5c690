"""Greedy parity with transformers (fp32) for tiny random DeepSeek models: V2 with a plain q_proj
(q_lora_rank None, as V2-Lite) and greedy routing, V2 with q LoRA and group_limited_greedy, and V3
(sigmoid scores with a correction bias, noaux_tc groups, renormalised) with YaRN rope; all with a dense
first layer, a shared expert and routed_scaling_factor. Alone, batched, chunked, paged, on a radix-cache
hit, with TP 2 (and EP 2) over gloo; the latent pool's size per token; and an fp8 latent cache that
gives the same tokens in every scenario."""

from __future__ import annotations

import random

import pytest
import torch

from radixserve import Engine
from tests.helpers import assert_pools_whole, hf_greedy, hf_logprobs

VOCAB = 512
MAX_NEW = 10
GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW}
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, initializer_range=0.1,
    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, kv_lora_rank=32, qk_rope_head_dim=16,
    qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}
ARCHS = {
    "v2_lite": ("DeepseekV2Config", dict(q_lora_rank=None, topk_method="greedy", n_shared_experts=2,
                                         routed_scaling_factor=1.0, norm_topk_prob=False, rope_scaling=YARN)),
    "v2_grouped": ("DeepseekV2Config", dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4,
                                            topk_group=2, n_shared_experts=1, routed_scaling_factor=16.0,
                                            norm_topk_prob=False)),
    "v3": ("DeepseekV3Config", dict(q_lora_rank=24, n_group=2, topk_group=1, n_shared_experts=1,
                                    routed_scaling_factor=2.5, norm_topk_prob=True,
                                    rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0})),
}
# per token: one latent row (kv_lora_rank + qk_rope_head_dim) per layer
LATENT_ELEMENTS_PER_TOKEN = 3 * (32 + 16)


def make_deepseek(arch: str, path: str, seed: int, overrides: dict | None = None):
    import transformers

    torch.manual_seed(seed)
    cls_name, extra = ARCHS[arch]
    cfg = getattr(transformers, cls_name)(**{**COMMON, **extra, **(overrides or {})})
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
            if bias is not None:  # transformers starts it at zero, which would hide a missing one
                bias.normal_(0, 0.1)
    model.save_pretrained(path)
    return model


def prompts(seed: int, count: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    batch = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(6, 50))] for _ in range(count)]
    batch.append(batch[-1][:30] + [rng.randrange(3, VOCAB) for _ in range(7)])  # shares a 30-token prefix
    return batch


_BUILT: dict[str, tuple] = {}


def built(arch: str, tmp_path_factory) -> tuple:
    """(arch, path, transformers model, prompts, expected tokens), made once per module run."""
    if arch not in _BUILT:
        path = str(tmp_path_factory.mktemp(arch))
        seed = 30 + list(ARCHS).index(arch)
        model = make_deepseek(arch, path, seed)
        batch = prompts(seed)
        _BUILT[arch] = (arch, path, model, batch, [hf_greedy(model, p, MAX_NEW) for p in batch])
    return _BUILT[arch]


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request, tmp_path_factory):
    return built(request.param, tmp_path_factory)


def test_routing_spreads_over_the_experts(tiny):
    """The prompts reach every expert of every sparse layer, so parity below covers each one."""
    _, _, model, batch, _ = tiny
    seen: dict[int, set[int]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None:
            continue

        def record(_mod, _inp, out, i=i):
            seen.setdefault(i, set()).update(out[2].flatten().tolist())  # (logits, weights, ids)

        hooks.append(gate.register_forward_hook(record))
    with torch.no_grad():
        for p in batch:
            model(torch.tensor([p]))
    for h in hooks:
        h.remove()
    assert len(seen) == 2 and all(len(ids) == 8 for ids in seen.values()), seen


@pytest.mark.parametrize("variant", ["default", "chunked16-page4"])
def test_greedy_parity(tiny, variant):
    _, path, model, batch, expected = tiny
    extra = {"chunked_prefill_size": 16, "page_size": 4} if variant != "default" else {}
    with Engine(model_path=path, dtype="float32", log_level="warning", **extra) as engine:
        assert engine.info["kv_bytes_per_token"] == 4 * LATENT_ELEMENTS_PER_TOKEN
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


def test_tp2_parity(tiny):
    check_parallel(tiny, {"tp_size": 2})


def test_tp2_ep2_parity(tmp_path_factory):
    """Experts 0..3 on rank 0, 4..7 on rank 1, the dense layer whole on both (once: the CI machine has
    two cores)."""
    check_parallel(built("v3", tmp_path_factory), {"tp_size": 2, "ep_size": 2, "moe_dense_tp_size": 1})


def check_parallel(tiny: tuple, parallel: dict) -> None:
    _, path, _, batch, expected = tiny
    with Engine(model_path=path, dtype="float32", log_level="warning", page_size=2, **parallel) as engine:
        outs = engine.generate(input_ids=batch, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == expected
        assert engine.generate(input_ids=batch[3], sampling_params=GREEDY)["output_ids"] == expected[3]
        assert_pools_whole(engine)


def test_odd_shapes_without_shared_experts(tmp_path_factory):
    """V3 with n_shared_experts 0 (transformers saves a zero-width shared MLP, which has no place here and
    is skipped), rope_interleave off (rotary dims in plain halves), a plain q_proj, 5 heads, 6 experts
    top-3 in one group, every layer sparse, and head dims that are no power of two; paged by 3, chunked
    by 7."""
    path = str(tmp_path_factory.mktemp("v3_odd"))
    odd = dict(hidden_size=48, intermediate_size=52, moe_intermediate_size=20, num_attention_heads=5,
               num_key_value_heads=5, q_lora_rank=None, kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=12,
               v_head_dim=20, n_routed_experts=6, num_experts_per_tok=3, n_group=1, topk_group=1,
               n_shared_experts=0, first_k_dense_replace=0, norm_topk_prob=False, rope_interleave=False)
    model = make_deepseek("v3", path, seed=40, overrides=odd)
    batch = prompts(40, count=4)
    expected = [hf_greedy(model, p, MAX_NEW) for p in batch]
    with Engine(model_path=path, dtype="float32", log_level="warning", page_size=3,
                chunked_prefill_size=7) as engine:
        assert engine.generate(input_ids=batch[0], sampling_params=GREEDY)["output_ids"] == expected[0]
        outs = engine.generate(input_ids=batch, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == expected
        assert_pools_whole(engine)


def test_fp8_latent_cache(tmp_path_factory):
    """--kv-cache-dtype fp8_e4m3 over the latent pool (V3): one byte an element, and the same tokens
    alone, batched, chunked and paged, and on cache hits (every key is read back from the pool)."""
    _, path, _, batch, expected = built("v3", tmp_path_factory)
    results = []
    for extra in ({}, {"chunked_prefill_size": 16, "page_size": 4}):
        with Engine(model_path=path, dtype="float32", log_level="warning", kv_cache_dtype="fp8_e4m3",
                    **extra) as engine:
            assert engine.info["kv_dtype"] == "float8_e4m3fn"
            assert engine.info["kv_bytes_per_token"] == LATENT_ELEMENTS_PER_TOKEN
            alone = [engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"] for p in batch[:2]]
            outs = [o["output_ids"] for o in engine.generate(input_ids=batch, sampling_params=GREEDY)]
            again = engine.generate(input_ids=batch, sampling_params=GREEDY)
            assert outs[:2] == alone and [o["output_ids"] for o in again] == outs
            assert all(o["meta_info"]["cached_tokens"] > 0 for o in again)
            assert_pools_whole(engine)
            results.append(outs)
    assert results[0] == results[1]
    # e4m3 rounding of the latent moves few tokens of a random model: most first tokens agree
    assert sum(o[0] == e[0] for o, e in zip(results[0], expected)) >= len(expected) // 2


def test_dummy_weights_in_bf16(tmp_path_factory):
    """--load-format dummy (benchmarks): the absorbed matrices are derived from the random weights, and
    bf16 runs with the router kept in fp32."""
    _, path, _, batch, _ = built("v3", tmp_path_factory)
    with Engine(model_path=path, load_format="dummy", dtype="bfloat16", log_level="warning", page_size=4) as engine:
        outs = engine.generate(input_ids=batch[:3], sampling_params={"temperature": 0, "max_new_tokens": 4})
        assert all(len(o["output_ids"]) == 4 for o in outs)
        assert_pools_whole(engine)
