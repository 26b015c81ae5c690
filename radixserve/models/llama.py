"""Llama-family decoder (Llama 2/3, SmolLM2; the base of Qwen2, Qwen3 and Mistral)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from radixserve.attention.base import AttentionLayerSpec
from radixserve.distributed.parallel_state import get_tp_size
from radixserve.layers.activation import SiluAndMul
from radixserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from radixserve.layers.gemv import gemv_silu_mul, takes_gemv
from radixserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from radixserve.layers.logits import LogitsOutput, compute_logits
from radixserve.layers.norm import RMSNorm
from radixserve.layers.rotary import RotaryEmbedding
from radixserve.loader import config as cfgutil
from radixserve.model_executor.forward_batch import ForwardBatch


@dataclass(frozen=True)
class ProjectionBiases:
    """Which projections carry a bias: each family reads this from its config differently."""

    qkv: bool = False
    o: bool = False
    mlp: bool = False


class LlamaAttention(nn.Module):
    def __init__(self, cfg, layer_id: int, qk_norm: bool = False, biases: ProjectionBiases = ProjectionBiases()) -> None:
        super().__init__()
        hidden, head_dim = cfg.hidden_size, cfgutil.head_dim(cfg)
        self.qkv_proj = QKVParallelLinear(
            hidden, head_dim, cfg.num_attention_heads, cfgutil.num_kv_heads(cfg), bias=biases.qkv
        )
        qkv = self.qkv_proj
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * head_dim, hidden, bias=biases.o,
                                        in_range=(qkv.q_head_start * head_dim, qkv.q_size))
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.head_dim = head_dim
        self.num_q_heads = self.q_size // head_dim
        self.q_norm = RMSNorm(head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.attn = AttentionLayerSpec(
            layer_id, self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim, head_dim**-0.5
        )

    def forward(self, rope: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        tokens = qkv.shape[0]
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.reshape(tokens, -1, self.head_dim)  # q heads then k heads: rotated in one go
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, : self.num_q_heads]), self.k_norm(qk[:, self.num_q_heads :])), dim=1)
        qk = rope(qk)
        q, k = qk[:, : self.num_q_heads], qk[:, self.num_q_heads :]
        out = self.attn(q.reshape(tokens, -1), k.reshape(tokens, -1), v, batch)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate, intermediate], bias=bias)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj.weight
        # one row: projection and activation in one kernel (which has no bias term)
        if self.gate_up_proj.bias is None and takes_gemv(x, gate_up):
            return self.down_proj(gemv_silu_mul(x, gate_up))
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, layer_id: int, qk_norm: bool, biases: ProjectionBiases) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_id, qk_norm, biases)
        self.mlp = LlamaMLP(cfg.hidden_size, cfg.intermediate_size, biases.mlp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, rope: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, residual: torch.Tensor | None,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, batch)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    qk_norm = False
    # checkpoint name piece -> (our fused parameter piece, shard id)
    stacked_params = (
        ("q_proj", "qkv_proj", "q"),
        ("k_proj", "qkv_proj", "k"),
        ("v_proj", "qkv_proj", "v"),
        ("gate_proj", "gate_up_proj", 0),
        ("up_proj", "gate_up_proj", 1),
    )

    def __init__(self, cfg, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(
            cfgutil.head_dim(cfg), max_positions, cfgutil.rope_theta(cfg), cfgutil.rope_scaling(cfg)
        )
        biases = self.projection_biases(cfg)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, self.qk_norm, biases) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if self.tied:
            self.lm_head.weight = self.embed_tokens.weight
        self.tp_size = get_tp_size()

    @staticmethod
    def projection_biases(cfg) -> ProjectionBiases:
        # as transformers' Llama: attention_bias covers q, k, v and o; mlp_bias the three MLP ones
        attn = bool(getattr(cfg, "attention_bias", False))
        return ProjectionBiases(qkv=attn, o=attn, mlp=bool(getattr(cfg, "mlp_bias", False)))

    @property
    def num_kv_heads_per_rank(self) -> int:
        return self.layers[0].self_attn.attn.num_kv_heads

    def forward(self, batch: ForwardBatch, prompt_top_k: int = 0) -> LogitsOutput:
        x = self.embed_tokens(batch.input_ids)
        rope = self.rotary.rotate_fn(batch.positions, x.dtype, x.device)
        residual = None
        for layer in self.layers:
            x, residual = layer(rope, x, residual, batch)
        x, _ = self.norm(x, residual)
        return compute_logits(x, self.lm_head, batch, prompt_top_k)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name.startswith("model."):
                name = name[len("model.") :]
            if name == "lm_head.weight" and self.tied:
                continue
            target, shard = name, None
            for ckpt_piece, our_piece, shard_id in self.stacked_params:
                if f".{ckpt_piece}." in name:
                    target, shard = name.replace(ckpt_piece, our_piece), shard_id
                    break
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param = params[target]
            loader = getattr(param, "weight_loader", None)
            with torch.no_grad():
                if loader is not None:
                    loader(param, tensor.to(param.dtype), shard)
                else:
                    param.data.copy_(tensor)
            loaded.add(target)
        missing = {n for n in params if n not in loaded}
        if self.tied:
            missing.discard("lm_head.weight")
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
