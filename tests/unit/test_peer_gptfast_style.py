"""The gpt-fast-style Mixtral peer (benchmarks/peers/gptfast_style_mixtral.py): it runs, its MoE is top-2 routing,
and its whole model computes transformers' Mixtral, so the peer's timings are for the real model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "peers" / "gptfast_style_mixtral.py"

TINY = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_hidden_layers": 2, "hidden_size": 64,
    "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
    "num_experts_per_tok": 2, "vocab_size": 128, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 64, "sliding_window": None, "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("gptfast_style_mixtral", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_cpu_smoke_run_writes_positive_tokens_per_s(peer, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    out = tmp_path / "result.json"
    peer.main(["--config", str(tmp_path), "--device", "cpu", "--no-compile", "--input-len", "8",
               "--output-len", "4", "--runs", "2", "--num-layers", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["decode_tokens_per_s"] > 0 and result["gptfast_tokens_per_s"] > 0
    assert result["prefill_s"] > 0 and len(result["runs"]) == 2
    assert result["kv_cache_len"] == 16 and result["batch_size"] == 1 and result["torch"] == torch.__version__


def _naive_moe(moe, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax router, top-k renormalised, SwiGLU experts mixed by those weights."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = F.softmax(moe.gate.weight @ x[t], dim=-1)
        weights, chosen = probs.topk(moe.s.top_k)
        weights = weights / weights.sum()
        for w, e in zip(weights, chosen.tolist()):
            h = F.silu(moe.w1[e] @ x[t]) * (moe.w3[e] @ x[t])
            out[t] += w * (moe.w2[e] @ h)
    return out


@torch.no_grad()
def test_moe_feed_forward_matches_naive_top2_reference(peer):
    torch.manual_seed(0)
    shape = peer.MixtralShape.from_hf(TINY)
    moe = peer.MoEFeedForward(shape)
    for p in moe.parameters():
        p.normal_(0, 0.3)  # large enough that the router's choice differs between tokens
    x = torch.randn(10, shape.dim)
    ref = _naive_moe(moe, x)
    chosen = F.softmax(x @ moe.gate.weight.T, -1).topk(2).indices
    assert len({tuple(sorted(c)) for c in chosen.tolist()}) > 1, "routing should vary across tokens"
    torch.testing.assert_close(moe(x), ref, atol=1e-5, rtol=1e-5)
    moe.tokens_per_gather = 3  # the prefill path that gathers in token slices computes the same
    torch.testing.assert_close(moe(x.view(1, 10, -1)), ref.view(1, 10, -1), atol=1e-5, rtol=1e-5)


def _to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # HF stores each head's rotary channels as [evens | odds]; the peer (like gpt-fast) rotates adjacent pairs
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


@torch.no_grad()
def test_forward_matches_transformers_mixtral(peer):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    hf = MixtralForCausalLM(MixtralConfig(**TINY, initializer_range=0.1, attn_implementation="eager")).eval()
    shape = peer.MixtralShape.from_hf(TINY)
    model = peer.MixtralPeer(shape).eval()
    sd, n_inter = hf.state_dict(), shape.ffn_dim
    model.tok_embeddings.weight.copy_(sd["model.embed_tokens.weight"])
    model.norm.weight.copy_(sd["model.norm.weight"])
    model.output.weight.copy_(sd["lm_head.weight"])
    for i, layer in enumerate(model.layers):
        pre = f"model.layers.{i}."
        q = _to_interleaved(sd[pre + "self_attn.q_proj.weight"], shape.n_heads)
        k = _to_interleaved(sd[pre + "self_attn.k_proj.weight"], shape.n_kv_heads)
        layer.attention.wqkv.weight.copy_(torch.cat([q, k, sd[pre + "self_attn.v_proj.weight"]]))
        layer.attention.wo.weight.copy_(sd[pre + "self_attn.o_proj.weight"])
        layer.attention_norm.weight.copy_(sd[pre + "input_layernorm.weight"])
        layer.ffn_norm.weight.copy_(sd[pre + "post_attention_layernorm.weight"])
        layer.moe.gate.weight.copy_(sd[pre + "mlp.gate.weight"])
        gate_up = sd[pre + "mlp.experts.gate_up_proj"]  # [E, 2I, H]: gate rows, then up rows
        layer.moe.w1.copy_(gate_up[:, :n_inter])
        layer.moe.w3.copy_(gate_up[:, n_inter:])
        layer.moe.w2.copy_(sd[pre + "mlp.experts.down_proj"])

    ids = torch.randint(0, shape.vocab, (1, 12))
    want = hf(ids).logits
    model.setup_caches(12)
    got = model(ids, torch.arange(12))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # prefill 8 tokens, then decode the rest one at a time through the static KV cache
    model.setup_caches(12)
    torch.testing.assert_close(model(ids[:, :8], torch.arange(8)), want[:, :8], atol=1e-4, rtol=1e-4)
    for t in range(8, 12):
        step = model(ids[:, t:t + 1], torch.tensor([t], dtype=torch.int))
        torch.testing.assert_close(step, want[:, t:t + 1], atol=1e-4, rtol=1e-4)
