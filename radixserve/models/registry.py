"""Architecture name (config.architectures[0]) -> model class."""

from __future__ import annotations

from radixserve.models.deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from radixserve.models.llama import LlamaForCausalLM
from radixserve.models.mistral import MistralForCausalLM
from radixserve.models.mixtral import MixtralForCausalLM
from radixserve.models.qwen2 import Qwen2ForCausalLM
from radixserve.models.qwen2_moe import Qwen2MoeForCausalLM
from radixserve.models.qwen3 import Qwen3ForCausalLM
from radixserve.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_CLASSES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}
# GGUF metadata gives a model_type rather than an architecture list.
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
               "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
               "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


def architecture_of(cfg) -> str:
    """The supported architecture a config names (its class is MODEL_CLASSES[...])."""
    archs = list(getattr(cfg, "architectures", None) or [])
    if not archs and getattr(cfg, "model_type", None) in MODEL_TYPES:
        archs = [MODEL_TYPES[cfg.model_type]]
    for arch in archs:
        if arch in MODEL_CLASSES:
            return arch
    name = ", ".join(archs) or f"model_type={getattr(cfg, 'model_type', None)!r}"
    raise ValueError(
        f"unsupported model architecture {name}; supported: {', '.join(sorted(MODEL_CLASSES))}"
    )


def model_class_for(cfg) -> type:
    return MODEL_CLASSES[architecture_of(cfg)]
