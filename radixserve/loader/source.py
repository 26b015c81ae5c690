"""Turn --model-path / --load-format / --tokenizer-path into one checked ModelSource."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

from radixserve.loader.bundled import bundled_gguf_path, is_bundled_name
from radixserve.loader.errors import ModelLoadError, first_line
from radixserve.loader.weights import hf_weight_files

SourceKind = Literal["hf", "gguf", "dummy"]
LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf", "dummy")

# Any of these in a folder means it carries a usable HF tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class ModelSource:
    """Where a model's config, weights and tokenizer come from.

    model_path: the model's folder (for a GGUF, the folder holding it), absolute.
    gguf_file: absolute path of the GGUF file, None for HF folders.
    tokenizer_path: a folder (or .gguf file) to load the tokenizer from; None when a dummy model has none.
    """

    kind: SourceKind
    model_path: str
    gguf_file: str | None
    tokenizer_path: str | None
    hf_config: Any  # transformers.PretrainedConfig
    load_format: str = "auto"


def _abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# what serving needs from a Hub repo: config, weights, tokenizer, and the code trust_remote_code runs
_HUB_FILES = ["*.json", "*.model", "*.tiktoken", "*.txt", "*.py", "*.jinja"]


def looks_like_hub_id(name: str) -> bool:
    """owner/name, as the runbook's --model-path meta-llama/Llama-3.1-8B-Instruct."""
    return _HUB_ID.fullmatch(name) is not None and ".." not in name


def hub_snapshot(repo_id: str, load_format: str) -> str:
    """The local folder of a Hugging Face Hub model: from the HF cache (HF_HOME / HF_HUB_CACHE) when it
    is there, downloaded otherwise (HF_HUB_OFFLINE=1: the cache only), as SGLang does. Weights are
    fetched only when they will be read: safetensors, or .bin files for `pt` (and for `auto` when the
    repo has no safetensors)."""
    from huggingface_hub import snapshot_download

    weights = {"auto": ["*.safetensors"], "safetensors": ["*.safetensors"], "pt": ["*.bin"]}.get(load_format, [])
    try:
        path = snapshot_download(repo_id, allow_patterns=_HUB_FILES + weights)
        if load_format == "auto" and not any(n.endswith(".safetensors") for n in os.listdir(path)):
            path = snapshot_download(repo_id, allow_patterns=_HUB_FILES + ["*.bin"])
        return path
    except Exception as e:
        raise ModelLoadError(
            f"{repo_id!r} is not a local path, and the Hugging Face Hub did not give it: {first_line(e)}"
        ) from None


def _is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def load_hf_config(model_dir: str, trust_remote_code: bool = False) -> Any:
    """AutoConfig for a folder, with one-line errors; unknown model types still load (as PretrainedConfig)
    so the model registry, not transformers, decides what is supported."""
    from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ModelLoadError(f"model folder {model_dir} has no config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"malformed JSON in {config_path}: {e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"cannot read {config_path}: {first_line(e)}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{config_path} must hold a JSON object, not {type(data).__name__}")
    try:
        if data.get("model_type") not in CONFIG_MAPPING and not trust_remote_code:
            cfg = PretrainedConfig.from_dict(data)
            cfg._name_or_path = model_dir
            return cfg
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"invalid config {config_path}: {first_line(e)}") from e


def _find_gguf_in_dir(model_dir: str) -> str | None:
    ggufs = sorted(name for name in os.listdir(model_dir) if _is_gguf(name))
    if len(ggufs) > 1:
        raise ModelLoadError(
            f"model folder {model_dir} holds {len(ggufs)} .gguf files ({', '.join(ggufs)}); pass one file as the model path"
        )
    return os.path.join(model_dir, ggufs[0]) if ggufs else None


def _default_tokenizer_dir(model_dir: str) -> str | None:
    has_tokenizer = any(os.path.isfile(os.path.join(model_dir, n)) for n in _TOKENIZER_FILES)
    return model_dir if has_tokenizer else None


def _gguf_source(gguf_file: str, load_format: str, tokenizer_path: str | None, trust: bool) -> ModelSource:
    from radixserve.loader.gguf import load_gguf_config

    if load_format in ("safetensors", "pt"):
        raise ModelLoadError(f"--load-format {load_format} cannot load the GGUF file {gguf_file}")
    if not os.path.isfile(gguf_file):
        raise ModelLoadError(f"GGUF file {gguf_file} does not exist")
    cfg = load_gguf_config(gguf_file, trust_remote_code=trust)
    return ModelSource(
        kind="dummy" if load_format == "dummy" else "gguf",
        model_path=os.path.dirname(gguf_file),
        gguf_file=gguf_file,
        tokenizer_path=tokenizer_path or gguf_file,
        hf_config=cfg,
        load_format=load_format,
    )


def resolve_model_source(
    model_path: str | None,
    load_format: str = "auto",
    tokenizer_path: str | None = None,
    *,
    trust_remote_code: bool = False,
) -> ModelSource:
    """Decide what `model_path` is and load its config. Raises ModelLoadError (one line naming the path).

    None or the bundled name -> the bundled GGUF; a `.gguf` file -> gguf; a folder with config.json -> hf
    (dummy under --load-format dummy, which needs nothing but config.json); a folder holding exactly one
    .gguf and no config.json -> gguf.
    """
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(
            f"unknown load format {load_format!r}; expected one of {', '.join(LOAD_FORMATS)}"
        )
    if tokenizer_path is not None:
        given = tokenizer_path
        tokenizer_path = _abspath(given)
        if not os.path.exists(tokenizer_path) and looks_like_hub_id(given):
            tokenizer_path = hub_snapshot(given, "dummy")
        if not os.path.exists(tokenizer_path):
            raise ModelLoadError(f"tokenizer path {tokenizer_path} does not exist")

    if is_bundled_name(model_path):
        return _gguf_source(bundled_gguf_path(), load_format, tokenizer_path, trust_remote_code)

    assert model_path is not None
    path = _abspath(model_path)
    if not os.path.exists(path) and looks_like_hub_id(model_path):
        path = hub_snapshot(model_path, load_format)
    if not os.path.exists(path):
        hint = (
            ""
            if model_path == path
            else f" (given as {model_path!r}; local folders, .gguf files and Hub ids owner/name load)"
        )
        raise ModelLoadError(f"model path {path} does not exist{hint}")
    if os.path.isfile(path):
        if _is_gguf(path):
            return _gguf_source(path, load_format, tokenizer_path, trust_remote_code)
        raise ModelLoadError(
            f"model path {path} is a file but not a .gguf; pass a GGUF file or a model folder"
        )

    has_config = os.path.isfile(os.path.join(path, "config.json"))
    if load_format == "gguf" or not has_config:
        gguf_file = _find_gguf_in_dir(path)
        if gguf_file is not None:
            return _gguf_source(gguf_file, load_format, tokenizer_path, trust_remote_code)
        if load_format == "gguf":
            raise ModelLoadError(f"--load-format gguf needs a .gguf file, but model path {path} has none")
        raise ModelLoadError(f"model folder {path} has no config.json (and no .gguf file)")

    cfg = load_hf_config(path, trust_remote_code)
    if load_format == "dummy":
        kind: SourceKind = "dummy"
    else:
        kind = "hf"
        hf_weight_files(path, load_format)  # fail now, not after the engine has set up
    return ModelSource(
        kind=kind,
        model_path=path,
        gguf_file=None,
        tokenizer_path=tokenizer_path or (_default_tokenizer_dir(path) if kind == "dummy" else path),
        hf_config=cfg,
        load_format=load_format,
    )
