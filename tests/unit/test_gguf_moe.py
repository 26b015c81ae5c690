"""GGUF files of Mixture-of-Experts models (llama.cpp's qwen2moe / qwen3moe layout: router, experts
stacked [E, rows, cols], a shared expert with a vector gate): the config gets the expert sizes
transformers' converter drops, and greedy output equals transformers reading the same file."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from radixserve import Engine
from radixserve.loader.gguf import load_gguf_config
from tests.helpers import assert_pools_whole, hf_greedy

HIDDEN, INTER, N_HEAD, N_KV, VOCAB, HEAD_DIM = 64, 96, 4, 2, 256, 32
EXPERTS, TOP_K, EXPERT_INTER, SHARED_INTER = 6, 2, 40, 56


def write_moe_gguf(path: Path, arch: str) -> None:
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter
    from gguf.quants import quantize

    # Qwen2-MoE has no head_dim of its own: hidden / heads
    head_dim = HEAD_DIM if arch == "qwen3moe" else HIDDEN // N_HEAD
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_KV)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_expert_count(EXPERTS)
    writer.add_expert_used_count(TOP_K)
    writer.add_expert_feed_forward_length(EXPERT_INTER)
    if arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(SHARED_INTER)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_token_types([1] * VOCAB)
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_merges([])
    writer.add_eos_token_id(1)
    rng = np.random.default_rng(7)

    def add(name: str, shape: tuple[int, ...], qtype: Q = Q.F32, scale: float = 0.3) -> None:
        arr = (rng.standard_normal(shape) * scale).astype(np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, arr)
        else:
            packed = quantize(arr, qtype)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)

    add("token_embd.weight", (VOCAB, HIDDEN), scale=1.0)
    add("output_norm.weight", (HIDDEN,), scale=1.0)
    add("output.weight", (VOCAB, HIDDEN))
    q_dim, kv_dim = N_HEAD * head_dim, N_KV * head_dim
    for layer in range(2):
        p = f"blk.{layer}."
        add(p + "attn_q.weight", (q_dim, HIDDEN))
        add(p + "attn_k.weight", (kv_dim, HIDDEN))
        add(p + "attn_v.weight", (kv_dim, HIDDEN))
        add(p + "attn_output.weight", (HIDDEN, q_dim))
        if arch == "qwen3moe":
            add(p + "attn_q_norm.weight", (head_dim,), scale=1.0)
            add(p + "attn_k_norm.weight", (head_dim,), scale=1.0)
        else:
            for part, size in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                add(p + f"attn_{part}.bias", (size,))
        add(p + "attn_norm.weight", (HIDDEN,), scale=1.0)
        add(p + "ffn_norm.weight", (HIDDEN,), scale=1.0)
        add(p + "ffn_gate_inp.weight", (EXPERTS, HIDDEN), scale=1.0)
        add(p + "ffn_gate_exps.weight", (EXPERTS, EXPERT_INTER, HIDDEN), Q.Q8_0)  # 3-D and quantized
        add(p + "ffn_up_exps.weight", (EXPERTS, EXPERT_INTER, HIDDEN))
        add(p + "ffn_down_exps.weight", (EXPERTS, HIDDEN, EXPERT_INTER))
        if arch == "qwen2moe":
            add(p + "ffn_gate_inp_shexp.weight", (HIDDEN,))
            add(p + "ffn_gate_shexp.weight", (SHARED_INTER, HIDDEN))
            add(p + "ffn_up_shexp.weight", (SHARED_INTER, HIDDEN))
            add(p + "ffn_down_shexp.weight", (HIDDEN, SHARED_INTER))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe"])
def test_moe_gguf_matches_transformers(arch, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("RADIXSERVE_CACHE_DIR", str(tmp_path / "cache"))
    gguf_path = tmp_path / f"tiny-{arch}.gguf"
    write_moe_gguf(gguf_path, arch)
    cfg = load_gguf_config(str(gguf_path))
    assert cfg.moe_intermediate_size == EXPERT_INTER and cfg.num_experts == EXPERTS
    assert cfg.norm_topk_prob == (arch == "qwen3moe")
    if arch == "qwen2moe":
        assert cfg.shared_expert_intermediate_size == SHARED_INTER
    # transformers reads the same file given the completed config
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf_path.name, config=cfg,
                                              dtype=torch.float32).eval()
    rng = random.Random(3)
    batch = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(3, 30))] for _ in range(4)]
    expected = [hf_greedy(hf, p, 8, eos_id=None) for p in batch]
    with Engine(model_path=str(gguf_path), dtype="float32", log_level="warning") as engine:
        outs = engine.generate(input_ids=batch, sampling_params={"temperature": 0, "max_new_tokens": 8,
                                                                 "ignore_eos": True})
        assert [o["output_ids"] for o in outs] == expected
        assert_pools_whole(engine)
