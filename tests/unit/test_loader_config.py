"""The loader's config helpers (radixserve/loader/config.py): rope, head and KV-head counts, context
length, dtype and EOS ids, from config.json, from transformers' classes and from transformers-4-style
attributes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from radixserve.loader import config as C
from radixserve.loader import resolve_model_source

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def test_rope_helpers_llama3_from_json(tmp_path: Path) -> None:
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "intermediate_size": 128,
        "vocab_size": 100,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_SCALING,
        "torch_dtype": "bfloat16",
        "eos_token_id": [7, 8],
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = resolve_model_source(str(tmp_path), load_format="dummy").hf_config
    assert C.rope_theta(hf) == 500000.0
    assert C.rope_scaling(hf) == LLAMA3_SCALING
    assert C.head_dim(hf) == 16 and C.num_kv_heads(hf) == 2
    assert C.context_length(hf) == 131072
    assert C.torch_dtype_of(hf) == torch.bfloat16
    assert C.eos_token_ids(hf) == [7, 8]
    tok, gen = SimpleNamespace(eos_token_id=9), SimpleNamespace(eos_token_id=[8, 10])
    assert C.eos_token_ids(hf, tok, gen) == [7, 8, 10, 9]


def test_rope_helpers_default_config() -> None:
    from transformers import LlamaConfig, Qwen2Config

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=2048, eos_token_id=2)
    assert C.rope_theta(cfg) == 10000.0 and C.rope_scaling(cfg) is None
    assert C.num_kv_heads(cfg) == 4 and C.head_dim(cfg) == 16 and C.context_length(cfg) == 2048
    assert C.torch_dtype_of(cfg) is None and C.torch_dtype_of(cfg, torch.float16) == torch.float16
    assert C.eos_token_ids(cfg, SimpleNamespace(eos_token_id=2)) == [2]
    # Qwen2Config has no head_dim attribute at all.
    qwen = Qwen2Config(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, rope_theta=1e6)
    assert C.head_dim(qwen) == 8 and C.num_kv_heads(qwen) == 2 and C.rope_theta(qwen) == 1e6


def test_rope_helpers_transformers4_style() -> None:
    # transformers 4 keeps rope_theta / rope_scaling / torch_dtype as plain attributes.
    old = SimpleNamespace(
        rope_theta=1e6,
        rope_scaling={"type": "linear", "factor": 2.0},
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=None,
        head_dim=None,
        max_position_embeddings=4096,
        torch_dtype="float16",
        eos_token_id=3,
    )
    assert C.rope_theta(old) == 1e6
    assert C.rope_scaling(old) == {"rope_type": "linear", "factor": 2.0}
    assert C.head_dim(old) == 16 and C.num_kv_heads(old) == 4
    assert C.torch_dtype_of(old) == torch.float16 and C.eos_token_ids(old) == [3]
    old.rope_scaling = {"rope_type": "default"}
    assert C.rope_scaling(old) is None
