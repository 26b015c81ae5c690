"""The model's shape, read once from its Hugging Face config into one normalised dataclass.

Families spell the same thing differently (Mixtral's `num_local_experts`, Qwen's `num_experts`,
DeepSeek's `n_routed_experts`; Qwen2's attention biases that no flag announces; Qwen-MoE's
`decoder_sparse_step` and `mlp_only_layers`, DeepSeek's `first_k_dense_replace` and `moe_layer_freq`).
`ModelConfig.from_hf` resolves all of it here, so models, the memory planner and the KV layout read
plain fields and never the raw config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from radixserve.loader import config as cfgutil

# architectures whose q/k/v projections always carry a bias (and nothing else does), whatever the flags say
_QKV_BIAS_ALWAYS = frozenset({"Qwen2ForCausalLM"})
# Qwen2-MoE: q/k/v biases unless the config turns them off (transformers 5's qkv_bias)
_QKV_BIAS_FLAG = frozenset({"Qwen2MoeForCausalLM"})
# architectures with RMSNorm over each head of q and k before rotary
_QK_NORM = frozenset({"Qwen3ForCausalLM", "Qwen3MoeForCausalLM"})
# architectures with no projection bias at all
_NO_BIAS = frozenset({"MistralForCausalLM", "MixtralForCausalLM"})
# DeepSeek's multi-head latent attention (MLA) and grouped routing
_DEEPSEEK = frozenset({"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"})
# MoE architectures that rescale the top-k weights to sum to 1 whatever the config says (no norm_topk_prob)
_ALWAYS_RENORMALIZE = frozenset({"MixtralForCausalLM"})
# expert selection methods DeepSeek configs name (topk_method)
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class MoEConfig:
    """The experts of a Mixture-of-Experts model."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert
    renormalize: bool  # the top-k softmax weights are rescaled to sum to 1
    # a dense expert every token also goes through, scaled by sigmoid(its gate) (Qwen2-MoE); 0 = none
    shared_expert_intermediate_size: int = 0
    sparse_layers: tuple[bool, ...] = ()  # per layer: experts (True) or a dense MLP (False)
    # DeepSeek: a plain (ungated) shared MLP of this size added to the experts' output; 0 = none
    shared_experts_intermediate_size: int = 0
    # DeepSeek's grouped routing: experts in n_group groups, the best topk_group groups eligible
    scoring: str = "softmax"  # "softmax" (V2, Mixtral, Qwen) or "sigmoid" (V3)
    topk_method: str = "greedy"  # greedy, group_limited_greedy (V2) or noaux_tc (V3: a score correction bias)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # the routed experts' weights are multiplied by this

    def is_sparse(self, layer_id: int) -> bool:
        return self.sparse_layers[layer_id]

    @property
    def grouped(self) -> bool:
        """Routing the DeepSeek way (router.select_experts_grouped) rather than plain softmax top-k."""
        return self.topk_method != "greedy" or self.scoring != "softmax" or self.routed_scaling_factor != 1.0


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek's multi-head latent attention: per token and layer the cache holds one latent of
    kv_lora_rank + qk_rope_head_dim values, shared by every head."""

    q_lora_rank: int | None  # None: a plain q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    # the checkpoint's rotary dims come in interleaved pairs (V2 always; V3 unless rope_interleave is off)
    rope_interleave: bool = True

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # of a dense MLP
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    context_length: int | None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    moe: MoEConfig | None = None
    mla: MLAConfig | None = None
    hf: Any = field(default=None, compare=False, repr=False)  # the raw config, for what no model reads

    @property
    def kv_layout(self) -> tuple[int, int, int]:
        """(layers, KV heads, head dim) of the whole model's KV cache, before any TP split (MLA: one
        latent "head" of kv_lora_rank + qk_rope_head_dim, which TP does not split)."""
        if self.mla is not None:
            return self.num_layers, 1, self.mla.latent_dim
        return self.num_layers, self.num_kv_heads, self.head_dim

    @classmethod
    def from_hf(cls, hf_cfg: Any, architecture: str) -> ModelConfig:
        cfg = cfgutil.text_config(hf_cfg)
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        if architecture in _QKV_BIAS_ALWAYS:
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif architecture in _QKV_BIAS_FLAG:
            qkv_bias, o_bias, mlp_bias = bool(getattr(cfg, "qkv_bias", True)), False, False
        elif architecture in _NO_BIAS:
            qkv_bias = o_bias = mlp_bias = False
        elif architecture in _DEEPSEEK:  # attention_bias: q_a, kv_a and o projections; mlp_bias (V2) the MLPs
            qkv_bias = o_bias = attention_bias
            # transformers' V3 MLPs have no bias whatever the config says
            mlp_bias = architecture == "DeepseekV2ForCausalLM" and bool(getattr(cfg, "mlp_bias", False))
        else:  # transformers' Llama/Qwen3: attention_bias covers q, k, v and o; mlp_bias the MLP's three
            qkv_bias = o_bias = attention_bias
            mlp_bias = bool(getattr(cfg, "mlp_bias", False)) and architecture not in _QK_NORM
        num_layers = int(cfg.num_hidden_layers)
        return cls(
            architecture=architecture,
            vocab_size=int(cfg.vocab_size),
            hidden_size=int(cfg.hidden_size),
            num_layers=num_layers,
            num_heads=cfgutil.num_attention_heads(cfg),
            num_kv_heads=cfgutil.num_kv_heads(cfg),
            head_dim=cfgutil.head_dim(cfg),
            intermediate_size=int(getattr(cfg, "intermediate_size", 0) or 0),
            rms_norm_eps=float(cfg.rms_norm_eps),
            rope_theta=cfgutil.rope_theta(cfg),
            rope_scaling=cfgutil.rope_scaling(cfg),
            context_length=cfgutil.context_length(cfg),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias,
            qk_norm=architecture in _QK_NORM,
            moe=moe_config(cfg, num_layers, architecture),
            mla=mla_config(cfg, architecture) if architecture in _DEEPSEEK else None,
            hf=hf_cfg,
        )


def mla_config(cfg: Any, architecture: str) -> MLAConfig:
    """DeepSeek's latent attention dims (q_lora_rank null: a plain q_proj)."""
    q_lora = getattr(cfg, "q_lora_rank", None)
    # transformers' V3 rotates plain halves when rope_interleave is false (or null); its V2 has no such flag
    interleave = architecture != "DeepseekV3ForCausalLM" or bool(getattr(cfg, "rope_interleave", True))
    mla = MLAConfig(
        q_lora_rank=int(q_lora) if q_lora else None,
        kv_lora_rank=int(cfg.kv_lora_rank),
        qk_nope_head_dim=int(cfg.qk_nope_head_dim),
        qk_rope_head_dim=int(cfg.qk_rope_head_dim),
        v_head_dim=int(cfg.v_head_dim),
        rope_interleave=interleave,
    )
    if mla.qk_rope_head_dim % 2:
        raise ValueError(f"qk_rope_head_dim ({mla.qk_rope_head_dim}) must be even (rotary pairs)")
    return mla


def _deepseek_moe(cfg: Any, num_layers: int, architecture: str) -> MoEConfig | None:
    """DeepSeek-V2/V3 experts: the first first_k_dense_replace layers dense, then every moe_layer_freq-th
    sparse; grouped routing; n_shared_experts plain MLPs (one of n_shared * moe_intermediate_size)."""
    num_experts = getattr(cfg, "n_routed_experts", None)
    if not num_experts:
        return None
    num_experts = int(num_experts)
    v3 = architecture == "DeepseekV3ForCausalLM"
    top_k = int(cfg.num_experts_per_tok)
    expert_size = int(cfg.moe_intermediate_size)
    first_dense = int(getattr(cfg, "first_k_dense_replace", 0) or 0)
    freq = int(getattr(cfg, "moe_layer_freq", 1) or 1)
    sparse = tuple(i >= first_dense and i % freq == 0 for i in range(num_layers))
    # transformers' V3 always scores by sigmoid with the correction bias; V2 by softmax
    scoring = getattr(cfg, "scoring_func", None) or ("sigmoid" if v3 else "softmax")
    topk_method = getattr(cfg, "topk_method", None) or ("noaux_tc" if v3 else "greedy")
    if v3:
        scoring, topk_method = "sigmoid", "noaux_tc"
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring_func {scoring!r} is not supported (supported: softmax, sigmoid)")
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"topk_method {topk_method!r} is not supported (supported: {', '.join(TOPK_METHODS)})")
    grouped = topk_method != "greedy"
    n_group = int(getattr(cfg, "n_group", None) or 1) if grouped else 1
    topk_group = int(getattr(cfg, "topk_group", None) or n_group) if grouped else 1
    if num_experts % n_group:
        raise ValueError(f"n_group ({n_group}) does not divide the {num_experts} routed experts")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group ({topk_group}) must be between 1 and n_group ({n_group})")
    if top_k > topk_group * (num_experts // n_group):
        raise ValueError(f"num_experts_per_tok ({top_k}) exceeds the experts of the {topk_group} chosen groups")
    if topk_method == "noaux_tc" and num_experts // n_group < 2:
        raise ValueError("topk_method noaux_tc scores a group by its two best experts: groups need at least 2")
    n_shared = int(getattr(cfg, "n_shared_experts", 0) or 0)
    return MoEConfig(
        num_experts=num_experts, top_k=top_k, intermediate_size=expert_size,
        # V3 rescales whenever norm_topk_prob; DeepSeek's V2 code only for top_k > 1 (transformers' V2
        # router ignores the flag; every published V2 config has it off)
        renormalize=bool(getattr(cfg, "norm_topk_prob", False)) and (v3 or top_k > 1),
        sparse_layers=sparse, shared_experts_intermediate_size=n_shared * expert_size,
        scoring=scoring, topk_method=topk_method, n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=float(getattr(cfg, "routed_scaling_factor", 1.0) or 1.0),
    )


def moe_config(cfg: Any, num_layers: int, architecture: str = "") -> MoEConfig | None:
    """The experts as the config describes them, or None for a dense model."""
    if architecture in _DEEPSEEK:
        return _deepseek_moe(cfg, num_layers, architecture)
    num_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if not num_experts:
        return None
    top_k = int(cfg.num_experts_per_tok)
    # Mixtral always rescales its top-k; Qwen-MoE only with norm_topk_prob (Qwen2-MoE: off by default).
    # Told apart by architecture, not by num_local_experts: transformers 5's Qwen3MoeConfig has it too (an alias)
    renormalize = architecture in _ALWAYS_RENORMALIZE or bool(getattr(cfg, "norm_topk_prob", False))
    expert_size = int(getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size)
    step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    dense_only = set(getattr(cfg, "mlp_only_layers", None) or [])
    sparse = tuple(i not in dense_only and (i + 1) % step == 0 for i in range(num_layers))
    if top_k > num_experts:
        raise ValueError(f"num_experts_per_tok ({top_k}) exceeds the number of experts ({num_experts})")
    return MoEConfig(
        num_experts=int(num_experts), top_k=top_k, intermediate_size=expert_size, renormalize=renormalize,
        shared_expert_intermediate_size=int(getattr(cfg, "shared_expert_intermediate_size", 0) or 0),
        sparse_layers=sparse,
    )
