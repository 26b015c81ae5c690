"""DeepSeek's rotary: YaRN frequencies and magnitude, the interleaved layout and the MLA softmax scale,
against transformers' DeepSeek-V2 (complex) and V3 (interleaved cos/sin) code."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers.rotary import RotaryEmbedding, apply_rotary, deinterleave, yarn_softmax_scale
from radixserve.loader import config as cfgutil

ROPE_DIM = 16
YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}


def _config(arch: str, rope_scaling: dict | None):
    import transformers

    cls = transformers.DeepseekV3Config if arch == "v3" else transformers.DeepseekV2Config
    return cls(hidden_size=64, num_attention_heads=4, qk_rope_head_dim=ROPE_DIM, qk_nope_head_dim=16,
               v_head_dim=16, kv_lora_rank=32, max_position_embeddings=512, rope_theta=10000.0,
               rope_scaling=rope_scaling)


def _ours(cfg):
    return RotaryEmbedding(ROPE_DIM, 512, cfgutil.rope_theta(cfg), cfgutil.rope_scaling(cfg),
                           cfgutil.context_length(cfg))


@pytest.mark.parametrize("scaling", [None, YARN, {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
                                     {**YARN, "mscale": None, "mscale_all_dim": None}])
def test_v3_rotary_matches_transformers(scaling):
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m

    cfg = _config("v3", scaling)
    theirs = m.DeepseekV3RotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 5, 63, 64, 200, 511]])
    q, k = torch.randn(1, 4, 7, ROPE_DIM), torch.randn(1, 1, 7, ROPE_DIM)
    cos, sin = theirs(q, pos)
    tq, tk = m.apply_rotary_pos_emb_interleave(q, k, cos, sin)
    rope = _ours(cfg)
    c, s = rope.cos_sin(pos[0], torch.float32)
    oq = apply_rotary(deinterleave(q[0].transpose(0, 1)), c, s).transpose(0, 1)
    ok = apply_rotary(deinterleave(k[0].transpose(0, 1)), c, s).transpose(0, 1)
    assert torch.allclose(oq, tq[0], atol=1e-5) and torch.allclose(ok, tk[0], atol=1e-5)


def test_v2_rotary_matches_transformers():
    """V2 rotates in complex pairs and keeps them interleaved: the same dot products as ours."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m

    cfg = _config("v2", YARN)
    freqs = m.DeepseekV2RotaryEmbedding(cfg)(torch.zeros(1), torch.tensor([[3, 100, 400]]))
    q, k = torch.randn(1, 4, 3, ROPE_DIM), torch.randn(1, 1, 3, ROPE_DIM)
    tq, tk = m.apply_rotary_emb(q, k, freqs)
    rope = _ours(cfg)
    c, s = rope.cos_sin(torch.tensor([3, 100, 400]), torch.float32)
    oq = apply_rotary(deinterleave(q[0].transpose(0, 1)), c, s)
    ok = apply_rotary(deinterleave(k[0].transpose(0, 1)), c, s)
    assert torch.allclose(oq, deinterleave(tq[0].transpose(0, 1)), atol=1e-5)
    assert torch.allclose(ok, deinterleave(tk[0].transpose(0, 1)), atol=1e-5)


def test_mla_softmax_scale_matches_transformers():
    from transformers.modeling_rope_utils import yarn_apply_mscale

    for scaling in (None, YARN, {**YARN, "mscale_all_dim": 0}):
        cfg = _config("v3", scaling)
        want = yarn_apply_mscale(cfg.rope_parameters, 32**-0.5)
        assert yarn_softmax_scale(cfgutil.rope_scaling(cfg), 32**-0.5) == pytest.approx(want, rel=1e-12)
    assert yarn_softmax_scale(cfgutil.rope_scaling(_config("v3", YARN)), 1.0) > 1.1  # mscale^2 is applied


@pytest.mark.parametrize("interleave", [True, False, None])
def test_v3_rope_interleave_flag(interleave):
    """V3's rope_interleave false (or null) has transformers rotate plain halves, so the model must not
    de-interleave; V2 has no such flag and always interleaves."""
    from radixserve.loader.model_config import mla_config

    cfg = _config("v3", None)
    cfg.rope_interleave = interleave
    assert mla_config(cfg, "DeepseekV3ForCausalLM").rope_interleave is bool(interleave)
    assert mla_config(_config("v2", None), "DeepseekV2ForCausalLM").rope_interleave
