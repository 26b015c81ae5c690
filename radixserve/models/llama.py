"""Llama-family decoder (Llama 2/3, SmolLM2; the base of Qwen2, Qwen3 and Mistral)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

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
from radixserve.layers.quantization.fp8_linear import fp8_gate_up_silu_mul
from radixserve.layers.rotary import RotaryEmbedding
from radixserve.loader.model_config import ModelConfig
from radixserve.model_executor.forward_batch import ForwardBatch

# FP8 checkpoints' KV cache scales, per layer: self_attn.k_scale / v_scale (or k_proj/v_proj.output_scale)
_KV_SCALE = re.compile(r"^layers\.(\d+)\.self_attn\.(?:([kv])_scale|([kv])_proj\.output_scale)$")


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        hidden, head_dim = cfg.hidden_size, cfg.head_dim
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, cfg.num_heads, cfg.num_kv_heads, bias=cfg.qkv_bias)
        qkv = self.qkv_proj
        self.o_proj = RowParallelLinear(cfg.num_heads * head_dim, hidden, bias=cfg.o_bias,
                                        in_range=(qkv.q_head_start * head_dim, qkv.q_size))
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.head_dim = head_dim
        self.num_q_heads = self.q_size // head_dim
        self.q_norm = RMSNorm(head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
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
    """gate/up, SiLU-and-mul, down. replicated: whole on every rank (--moe-dense-tp-size 1);
    reduce_results False: the output stays this rank's partial sum (the caller reduces); over_world:
    split over the MoE layers' ranks (a shared expert; the MoE layer reduces)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False, replicated: bool = False,
                 reduce_results: bool = True, over_world: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate, intermediate], bias=bias,
                                                       replicated=replicated, over_world=over_world)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=bias, replicated=replicated,
                                           reduce_results=reduce_results, over_world=over_world)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj.weight
        # one row: projection and activation in one kernel (which has no bias term)
        if self.gate_up_proj.bias is None and takes_gemv(x, gate_up):
            return self.down_proj(gemv_silu_mul(x, gate_up))
        fused = fp8_gate_up_silu_mul(x, self.gate_up_proj)
        if fused is not None:
            return self.down_proj(fused)
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_id)
        self.mlp = mlp
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
    # checkpoint name piece -> (our fused parameter piece, shard id)
    stacked_params = (
        ("q_proj", "qkv_proj", "q"),
        ("k_proj", "qkv_proj", "k"),
        ("v_proj", "qkv_proj", "v"),
        ("gate_proj", "gate_up_proj", 0),
        ("up_proj", "gate_up_proj", 1),
    )

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, self.make_mlp(cfg, i)) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.tied = cfg.tie_word_embeddings
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if self.tied and not self.lm_head.over_world:  # over the world, its slices differ: a copy is loaded
            self.lm_head.weight = self.embed_tokens.weight
        self.tp_size = get_tp_size()
        # (k_scale, v_scale) per layer, when the checkpoint has them (for --kv-cache-dtype fp8_e4m3)
        self.checkpoint_kv_scales: list[list[float]] | None = None

    def make_mlp(self, cfg: ModelConfig, layer_id: int) -> nn.Module:
        """The feed-forward of one layer (MoE models give some or all layers experts)."""
        return LlamaMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def checkpoint_target(self, name: str) -> tuple[str, object]:
        """(our parameter name, shard id) of a checkpoint tensor name (without its "model." prefix)."""
        for ckpt_piece, our_piece, shard_id in self.stacked_params:
            if f".{ckpt_piece}." in name:
                return name.replace(ckpt_piece, our_piece), shard_id
        return name, None

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
            scale = _KV_SCALE.match(name)
            if scale:
                if self.checkpoint_kv_scales is None:
                    self.checkpoint_kv_scales = [[1.0, 1.0] for _ in self.layers]
                kind = scale.group(2) or scale.group(3)
                self.checkpoint_kv_scales[int(scale.group(1))][kind == "v"] = float(tensor.float().max())
                continue
            target, shard = self.checkpoint_target(name)
            if target == "embed_tokens.weight" and self.tied and self.lm_head.over_world:
                self.lm_head.weight_loader(self.lm_head.weight, tensor.to(self.lm_head.weight.dtype))
                loaded.add("lm_head.weight")
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
