"""The model's shape, read once from its Hugging Face config into one normalised dataclass.

Families spell the same thing differently (Mixtral's `num_local_experts`, Qwen's `num_experts`; Qwen2's
attention biases that no flag announces; Qwen-MoE's `decoder_sparse_step` and `mlp_only_layers`).
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

    def is_sparse(self, layer_id: int) -> bool:
        return self.sparse_layers[layer_id]


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
    hf: Any = field(default=None, compare=False, repr=False)  # the raw config, for what no model reads

    @property
    def kv_layout(self) -> tuple[int, int, int]:
        """(layers, KV heads, head dim) of the whole model's KV cache, before any TP split."""
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
            moe=moe_config(cfg, num_layers),
            hf=hf_cfg,
        )


def moe_config(cfg: Any, num_layers: int) -> MoEConfig | None:
    """The experts as the config describes them, or None for a dense model."""
    num_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if not num_experts:
        return None
    top_k = int(cfg.num_experts_per_tok)
    mixtral = getattr(cfg, "num_local_experts", None) is not None
    # Mixtral always rescales its top-k; Qwen-MoE only with norm_topk_prob (Qwen2-MoE: off by default)
    renormalize = True if mixtral else bool(getattr(cfg, "norm_topk_prob", False))
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
