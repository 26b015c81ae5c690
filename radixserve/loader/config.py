"""Read a Hugging Face config the same way under transformers 4.x and 5.x.

transformers 5 moved `rope_theta` and `rope_scaling` into one `rope_parameters` dict (which always carries
`rope_theta` and `rope_type`, "default" when there is no scaling) and renamed `torch_dtype` to `dtype`;
`cfg.rope_scaling` and `cfg.torch_dtype` survive only as deprecated aliases. transformers 4 keeps them as
plain attributes, and older checkpoints spell the rope type as "type". These helpers hide the difference.
"""

from __future__ import annotations

from typing import Any

import torch

DEFAULT_ROPE_THETA = 10000.0

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def text_config(cfg: Any) -> Any:
    """The language-model part of a config (multimodal configs nest it); the config itself otherwise."""
    get = getattr(cfg, "get_text_config", None)
    if callable(get):
        try:
            return get()
        except (ValueError, AttributeError):
            return cfg
    return cfg


def _attr(cfg: Any, name: str) -> Any:
    # Read the instance dict first so transformers 5's deprecated alias properties are never touched.
    value = vars(cfg).get(name) if hasattr(cfg, "__dict__") else None
    return value if value is not None else getattr(cfg, name, None)


def _rope_dict(cfg: Any) -> dict[str, Any]:
    cfg = text_config(cfg)
    params = _attr(cfg, "rope_parameters")
    if isinstance(params, dict) and params:
        # Per-layer-type rope (e.g. gemma3 in transformers 5): use the full-attention entry.
        if "rope_theta" not in params and "rope_type" not in params and "type" not in params:
            nested = [v for v in params.values() if isinstance(v, dict)]
            if nested:
                params = params.get("full_attention", nested[0])
        return dict(params)
    # transformers 4: two separate attributes.
    merged: dict[str, Any] = dict(_attr(cfg, "rope_scaling") or {})
    theta = _attr(cfg, "rope_theta")
    if theta is not None:
        merged.setdefault("rope_theta", theta)
    return merged


def rope_theta(cfg: Any) -> float:
    theta = _rope_dict(cfg).get("rope_theta")
    return float(theta) if theta is not None else DEFAULT_ROPE_THETA


def rope_scaling(cfg: Any) -> dict[str, Any] | None:
    """The rope scaling dict with a normalised "rope_type" key and no "rope_theta"; None for plain rope."""
    params = _rope_dict(cfg)
    rope_type = params.get("rope_type") or params.get("type")
    if rope_type is None or rope_type == "default":
        return None
    out = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    out["rope_type"] = rope_type
    return out


def num_attention_heads(cfg: Any) -> int:
    return int(_attr(text_config(cfg), "num_attention_heads"))


def head_dim(cfg: Any) -> int:
    cfg = text_config(cfg)
    explicit = _attr(cfg, "head_dim")
    if explicit:
        return int(explicit)
    return int(_attr(cfg, "hidden_size")) // num_attention_heads(cfg)


def num_kv_heads(cfg: Any) -> int:
    kv = _attr(text_config(cfg), "num_key_value_heads")
    return int(kv) if kv else num_attention_heads(cfg)


def context_length(cfg: Any) -> int | None:
    """The longest sequence the model was trained for (max_position_embeddings), None if not stated."""
    cfg = text_config(cfg)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = _attr(cfg, name)
        if value:
            return int(value)
    return None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def eos_token_ids(cfg: Any, tokenizer: Any = None, generation_config: Any = None) -> list[int]:
    """Every token id that ends generation, deduplicated, config's first.

    Instruct models often list extra stop ids in generation_config.json (llama 3: <|eot_id|>) or only in
    the tokenizer, so all three sources are merged.
    """
    ids: list[int] = []
    sources = (text_config(cfg), generation_config, tokenizer)
    for source in sources:
        if source is None:
            continue
        for tid in _as_id_list(getattr(source, "eos_token_id", None)):
            if tid not in ids:
                ids.append(tid)
    return ids


def to_torch_dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.removeprefix("torch.").lower()
        if name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
    return None


def torch_dtype_of(cfg: Any, default: torch.dtype | None = None) -> torch.dtype | None:
    """The checkpoint's dtype from the config (`dtype` in 5.x, `torch_dtype` in 4.x); `default` if unset."""
    cfg_text = text_config(cfg)
    for source in (cfg, cfg_text):
        for name in ("dtype", "torch_dtype"):
            dtype = to_torch_dtype(vars(source).get(name) if hasattr(source, "__dict__") else None)
            if dtype is not None:
                return dtype
    return default
