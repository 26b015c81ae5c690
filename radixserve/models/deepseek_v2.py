"""DeepSeek-V2 and -V3: multi-head latent attention (MLA) over a latent KV cache, and grouped-routing
experts with a plain shared expert, as transformers defines them.

Attention runs in the "absorbed" form. Each token's kv_a_proj_with_mqa gives a compressed kv (RMS-normed,
kv_lora_rank wide) and a k_pe (qk_rope_head_dim, rotated); the pair is the one latent row the pool keeps
per token and layer. kv_b_proj would expand the compressed kv into every head's k_nope and v; instead its
K part (W_UK) is folded into the query (q_nope @ W_UK, kv_lora_rank wide, then the rotated q_pe) and its
V part (W_UV) applied to the attention output, so every head attends straight to the shared latent.
The scores equal transformers' q_nope . k_nope + q_pe . k_pe, and the output its probs @ v.

TP splits heads (q_b_proj / q_proj and kv_b_proj by output heads, o_proj by input heads); the down
projections, their norms and the latent are whole on every rank.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.attention.base import MLALayerSpec
from radixserve.distributed.dp_attention import gather_for_moe, own_rows
from radixserve.distributed.parallel_state import get_moe_parallel, get_tp_size, moe_all_reduce
from radixserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from radixserve.layers.linear import ColumnParallelLinear, RowParallelLinear
from radixserve.layers.moe.layer import FusedMoE
from radixserve.layers.moe.router import select_experts_grouped
from radixserve.layers.norm import RMSNorm
from radixserve.layers.quantization.fp8_utils import dequantize_block
from radixserve.layers.rotary import RotaryEmbedding, deinterleave, yarn_softmax_scale
from radixserve.loader.model_config import ModelConfig, MoEConfig
from radixserve.model_executor.forward_batch import ForwardBatch
from radixserve.models.llama import LlamaDecoderLayer, LlamaMLP
from radixserve.models.moe import MoECausalLM

# the LoRA-side norms use transformers' default epsilon, not the config's rms_norm_eps
_LORA_NORM_EPS = 1e-6
_LAYER = re.compile(r"^layers\.(\d+)\.")


class DeepseekV2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        mla = cfg.mla
        tp = get_tp_size()
        if cfg.num_heads % tp:
            raise ValueError(f"--tp-size {tp} does not divide the model's {cfg.num_heads} attention heads")
        self.num_heads = cfg.num_heads // tp
        self.nope, self.rope_dim, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.kv_lora_rank = mla.kv_lora_rank
        self.rope_interleave = mla.rope_interleave
        hidden, heads = cfg.hidden_size, cfg.num_heads
        self.q_proj = self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        if mla.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, heads * mla.qk_head_dim)
        else:
            self.q_a_proj = ColumnParallelLinear(hidden, mla.q_lora_rank, bias=cfg.qkv_bias, replicated=True)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, _LORA_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(mla.q_lora_rank, heads * mla.qk_head_dim)
        self.kv_a_proj_with_mqa = ColumnParallelLinear(hidden, mla.latent_dim, bias=cfg.qkv_bias, replicated=True)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, _LORA_NORM_EPS)
        self.kv_b_proj = ColumnParallelLinear(mla.kv_lora_rank, heads * (self.nope + self.v_dim))
        self.o_proj = RowParallelLinear(heads * self.v_dim, hidden, bias=cfg.o_bias)
        scaling = yarn_softmax_scale(cfg.rope_scaling, mla.qk_head_dim**-0.5)
        self.attn = MLALayerSpec(layer_id, self.num_heads, mla.kv_lora_rank, mla.qk_rope_head_dim, scaling)
        # kv_b_proj's halves per head, set by absorb_weights() once the weights are in
        self.w_uk: torch.Tensor | None = None  # [H, nope, kv_lora_rank]
        self.w_uv_t: torch.Tensor | None = None  # [H, kv_lora_rank, v]

    @torch.no_grad()
    def absorb_weights(self, dtype: torch.dtype) -> None:
        """W_UK and W_UV from kv_b_proj's weight ([H * (nope + v), kv_lora_rank]): views of it, or of a
        dequantised copy when the weight is FP8."""
        layer = self.kv_b_proj
        w = layer.weight
        if layer.fp8_block is not None:
            w = dequantize_block(w, layer.weight_scale_inv, layer.fp8_block, dtype)
        w = w.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        self.w_uk = w[:, : self.nope]
        self.w_uv_t = w[:, self.nope :].transpose(1, 2)

    def forward(self, rope: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        tokens, heads = x.shape[0], self.num_heads
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(tokens, heads, -1).split([self.nope, self.rope_dim], dim=-1)
        compressed, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        compressed = self.kv_a_layernorm(compressed.contiguous())
        # checkpoints keep rotary dims in interleaved pairs (unless V3's rope_interleave is off): regroup,
        # then rotate q and k in one go
        if self.rope_interleave:
            q_pe, k_pe = deinterleave(q_pe), deinterleave(k_pe)
        pe = rope(torch.cat((q_pe, k_pe.unsqueeze(1)), dim=1))
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [T, H, kv_lora_rank]
        q_abs = torch.cat((q_latent, pe[:, :heads]), dim=-1)
        latent = torch.cat((compressed, pe[:, heads]), dim=-1)
        out = self.attn(q_abs, latent, batch)  # [T, H, kv_lora_rank]
        out = torch.bmm(out.transpose(0, 1), self.w_uv_t).transpose(0, 1)  # [T, H, v]
        return self.o_proj(out.reshape(tokens, heads * self.v_dim))


class DeepseekGate(nn.Module):
    """The router: an fp32 [E, hidden] weight (as transformers keeps it), and V3's score correction bias."""

    def __init__(self, hidden: int, num_experts: int, correction_bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=torch.float32), requires_grad=False)
        self.e_score_correction_bias = None
        if correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                        requires_grad=False)


class DeepseekMoE(nn.Module):
    """Routed experts (grouped top-k, scaled) plus a plain shared expert, added; one all-reduce (over
    the world, on every DP group's tokens, under DP attention)."""

    spans_world = True

    def __init__(self, hidden: int, moe: MoEConfig, mlp_bias: bool) -> None:
        super().__init__()
        self.moe = moe
        self.gate = DeepseekGate(hidden, moe.num_experts, moe.topk_method == "noaux_tc")
        self.experts = FusedMoE(moe.num_experts, hidden, moe.intermediate_size)
        self.shared_experts: LlamaMLP | None = None
        if moe.shared_experts_intermediate_size:
            self.shared_experts = LlamaMLP(hidden, moe.shared_experts_intermediate_size, mlp_bias,
                                           reduce_results=False, over_world=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moe = self.moe
        x, own = gather_for_moe(x)
        logits = F.linear(x.float(), self.gate.weight)
        weights, ids = select_experts_grouped(
            logits, moe.top_k, scoring=moe.scoring, topk_method=moe.topk_method, n_group=moe.n_group,
            topk_group=moe.topk_group, renormalize=moe.renormalize,
            routed_scaling_factor=moe.routed_scaling_factor, correction_bias=self.gate.e_score_correction_bias,
        )
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return own_rows(moe_all_reduce(out), own)


class DeepseekV2DecoderLayer(LlamaDecoderLayer):
    """Llama's residual layout around MLA attention."""

    def __init__(self, cfg: ModelConfig, layer_id: int, mlp: nn.Module) -> None:
        nn.Module.__init__(self)
        self.self_attn = DeepseekV2Attention(cfg, layer_id)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV2ForCausalLM(MoECausalLM):
    # only the dense MLPs' gate/up are fused (q_proj stays q_proj: there is no k/v projection)
    stacked_params = (("gate_proj", "gate_up_proj", 0), ("up_proj", "gate_up_proj", 1))

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        nn.Module.__init__(self)
        if cfg.mla is None:
            raise ValueError(f"{cfg.architecture}: the config has no kv_lora_rank (multi-head latent attention)")
        self.config = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.mla.qk_rope_head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling,
                                      cfg.context_length)
        self.layers = nn.ModuleList(
            DeepseekV2DecoderLayer(cfg, i, self.make_mlp(cfg, i)) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.tied = cfg.tie_word_embeddings
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if self.tied and not self.lm_head.over_world:  # over the world, its slices differ: a copy is loaded
            self.lm_head.weight = self.embed_tokens.weight
        self.tp_size = get_tp_size()
        self.checkpoint_kv_scales = None  # an fp8 latent cache uses scale 1.0 per layer

    def make_mlp(self, cfg: ModelConfig, layer_id: int) -> nn.Module:
        if cfg.moe is not None and cfg.moe.is_sparse(layer_id):
            return DeepseekMoE(cfg.hidden_size, cfg.moe, cfg.mlp_bias)
        return LlamaMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias,
                        replicated=get_moe_parallel().dense_tp_size == 1)

    def after_weights_loaded(self) -> None:
        """Derive what forward needs from the loaded weights (the absorbed W_UK / W_UV)."""
        dtype = self.embed_tokens.weight.dtype
        for layer in self.layers:
            layer.self_attn.absorb_weights(dtype)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        num_layers = self.config.num_layers

        def ours(items):
            for name, tensor in items:
                m = _LAYER.match(name.removeprefix("model."))
                if m and int(m.group(1)) >= num_layers:
                    continue  # DeepSeek-V3's multi-token-prediction layer (model.layers.61) is not served
                yield name, tensor

        super().load_weights(ours(weights))
        self.after_weights_loaded()


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """V3: sigmoid scores with a correction bias and noaux_tc grouping (from ModelConfig.moe)."""
