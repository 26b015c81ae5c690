"""Stream a checkpoint's tensors as (Hugging Face name, CPU tensor), one at a time."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from radixserve.loader.errors import ModelLoadError, first_line

if TYPE_CHECKING:
    from radixserve.loader.source import ModelSource

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PT_SINGLE = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"


def _files_from_index(model_dir: str, index_name: str) -> list[str]:
    index_path = os.path.join(model_dir, index_name)
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"unreadable weight index {index_path}: {first_line(e)}") from e
    # Keep the index's order but open each shard once.
    files = [os.path.join(model_dir, name) for name in dict.fromkeys(weight_map.values())]
    for path in files:
        if not os.path.isfile(path):
            raise ModelLoadError(f"weight shard {path} listed in {index_path} is missing")
    return files


def _safetensors_files(model_dir: str) -> list[str]:
    if os.path.isfile(os.path.join(model_dir, SAFETENSORS_INDEX)):
        return _files_from_index(model_dir, SAFETENSORS_INDEX)
    if os.path.isfile(os.path.join(model_dir, SAFETENSORS_SINGLE)):
        return [os.path.join(model_dir, SAFETENSORS_SINGLE)]
    return []


def _pt_files(model_dir: str) -> list[str]:
    if os.path.isfile(os.path.join(model_dir, PT_INDEX)):
        return _files_from_index(model_dir, PT_INDEX)
    return sorted(glob.glob(os.path.join(glob.escape(model_dir), "pytorch_model*.bin")))


def hf_weight_files(model_dir: str, load_format: str = "auto") -> tuple[str, list[str]]:
    """("safetensors" | "pt", files) for a HF model folder; safetensors win under "auto"."""
    if load_format in ("auto", "safetensors"):
        files = _safetensors_files(model_dir)
        if files:
            return "safetensors", files
    if load_format in ("auto", "pt"):
        files = _pt_files(model_dir)
        if files:
            return "pt", files
    wanted = {
        "safetensors": f"{SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}",
        "pt": "pytorch_model*.bin",
    }.get(load_format, f"{SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or pytorch_model*.bin")
    raise ModelLoadError(f"no weights in {model_dir}: expected {wanted}")


def _iter_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError is not an OSError
        raise ModelLoadError(f"cannot read safetensors file {path}: {first_line(e)}") from e
    with handle as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def _iter_pt(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # mmap needs the zip format; old-style pickles load without it.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"cannot read PyTorch weights {path}: {first_line(e)}") from e
    except Exception as e:
        raise ModelLoadError(f"cannot read PyTorch weights {path}: {first_line(e)}") from e
    if not isinstance(state, dict):
        raise ModelLoadError(f"PyTorch weights {path} hold a {type(state).__name__}, not a state dict")
    yield from state.items()


def iter_weights(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint under its HF name (`model.layers.0.self_attn.q_proj.weight`, ...).

    Tied embeddings: when the checkpoint has no `lm_head.weight`, none is yielded; the model ties it.
    """
    if source.kind == "dummy":
        raise ModelLoadError(f"model {source.model_path} uses dummy weights; there are none to read")
    if source.kind == "gguf":
        from radixserve.loader.gguf import iter_gguf_weights

        assert source.gguf_file is not None
        yield from iter_gguf_weights(source.gguf_file)
        return
    fmt, files = hf_weight_files(source.model_path, source.load_format)
    reader = _iter_safetensors if fmt == "safetensors" else _iter_pt
    for path in files:
        yield from reader(path)
