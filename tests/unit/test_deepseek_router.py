"""DeepSeek's grouped routing (router.select_experts_grouped) against transformers' own V2 and V3 gate
modules with random weights: the same experts with the same weights for every token."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers.moe.router import select_experts_grouped
from radixserve.loader.model_config import ModelConfig

HIDDEN = 32


def _v2_config(**kw):
    import transformers

    base = dict(hidden_size=HIDDEN, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                routed_scaling_factor=2.0, topk_method="group_limited_greedy", norm_topk_prob=False,
                num_attention_heads=4, num_hidden_layers=2)
    return transformers.DeepseekV2Config(**{**base, **kw})


def _v3_config(**kw):
    import transformers

    base = dict(hidden_size=HIDDEN, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                routed_scaling_factor=2.5, norm_topk_prob=True, num_attention_heads=4, num_hidden_layers=2)
    return transformers.DeepseekV3Config(**{**base, **kw})


def _ours(hf_cfg, arch, gate, x):
    moe = ModelConfig.from_hf(hf_cfg, arch).moe
    logits = torch.nn.functional.linear(x.float(), gate.weight.float())
    bias = getattr(gate, "e_score_correction_bias", None)
    return select_experts_grouped(
        logits, moe.top_k, scoring=moe.scoring, topk_method=moe.topk_method, n_group=moe.n_group,
        topk_group=moe.topk_group, renormalize=moe.renormalize, routed_scaling_factor=moe.routed_scaling_factor,
        correction_bias=bias,
    )


def _same(ours, theirs):
    w, ids = ours
    tw, tids = theirs
    # expert order within a token is not part of the contract: compare sorted by expert id
    order, torder = ids.long().sort(dim=-1), tids.long().sort(dim=-1)
    assert torch.equal(order.values, torder.values)
    assert torch.allclose(w.gather(1, order.indices), tw.float().gather(1, torder.indices), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kw", [{"topk_method": "greedy"}, {"topk_method": "group_limited_greedy"},
                                {"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3}])
def test_v2_router_matches_transformers(kw):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    torch.manual_seed(0)
    cfg = _v2_config(**kw)
    gate = DeepseekV2TopkRouter(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(64, HIDDEN)
    _, tw, tids = gate(x)
    _same(_ours(cfg, "DeepseekV2ForCausalLM", gate, x), (tw, tids))


@pytest.mark.parametrize("kw", [{}, {"norm_topk_prob": False}, {"n_group": 2, "topk_group": 1},
                                {"n_group": 1, "topk_group": 1, "num_experts_per_tok": 6}])
def test_v3_router_matches_transformers(kw):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    torch.manual_seed(1)
    cfg = _v3_config(**kw)
    gate = DeepseekV3TopkRouter(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    # a bias that changes choices: it must steer selection but not the weights
    gate.e_score_correction_bias.copy_(torch.randn(16) * 0.3)
    x = torch.randn(64, HIDDEN)
    _, tw, tids = gate(x)
    _same(_ours(cfg, "DeepseekV3ForCausalLM", gate, x), (tw, tids))


def test_v3_bias_steers_the_choice():
    """With a large bias on one expert every token picks it, yet its weight is its unbiased score."""
    torch.manual_seed(2)
    logits = torch.randn(8, 16)
    bias = torch.zeros(16)
    bias[5] = 10.0
    w, ids = select_experts_grouped(logits, 2, scoring="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                                    renormalize=False, routed_scaling_factor=1.0, correction_bias=bias)
    assert (ids == 5).any(dim=-1).all()
    picked = w[ids == 5]
    assert torch.allclose(picked, logits[:, 5].sigmoid())


def test_bad_routing_configs_are_refused():
    with pytest.raises(ValueError, match="n_group"):
        ModelConfig.from_hf(_v3_config(n_group=3), "DeepseekV3ForCausalLM")
    with pytest.raises(ValueError, match="topk_method"):
        ModelConfig.from_hf(_v2_config(topk_method="nonsense"), "DeepseekV2ForCausalLM")


def test_deepseek_moe_config_fields():
    cfg = _v3_config(first_k_dense_replace=1, num_hidden_layers=4, n_shared_experts=2, moe_intermediate_size=24)
    mc = ModelConfig.from_hf(cfg, "DeepseekV3ForCausalLM")
    assert mc.moe.sparse_layers == (False, True, True, True)
    assert mc.moe.shared_experts_intermediate_size == 48 and mc.moe.intermediate_size == 24
    assert (mc.moe.scoring, mc.moe.topk_method, mc.moe.n_group, mc.moe.topk_group) == ("sigmoid", "noaux_tc", 4, 2)
    assert mc.mla.latent_dim == mc.mla.kv_lora_rank + mc.mla.qk_rope_head_dim
    assert mc.kv_layout == (4, 1, mc.mla.latent_dim)
    v2 = ModelConfig.from_hf(_v2_config(q_lora_rank=None, topk_method="greedy"), "DeepseekV2ForCausalLM")
    assert v2.mla.q_lora_rank is None and v2.moe.scoring == "softmax" and v2.moe.n_group == 1
