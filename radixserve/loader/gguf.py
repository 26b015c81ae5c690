"""GGUF files: tensors under Hugging Face names, and a disk cache for what transformers converts slowly.

llama.cpp stores a 2-D weight with its dims reversed (ne0 = columns first) and, for llama-family models,
with the rows of q_proj/k_proj permuted so that each head's rotary pairs are interleaved (GPT-J style)
instead of split in halves (NeoX style, what HF llama uses). We undo both, so the tensors match what
transformers builds from the same file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radixserve.loader.errors import ModelLoadError, first_line

logger = logging.getLogger(__name__)

# Bump when the layout of what we cache changes, so stale entries are ignored.
_CACHE_FORMAT = "2"

# llama.cpp's converter permutes q/k rows only for these architectures (qwen2/qwen3 are stored as-is).
PERMUTED_QK_ARCHS = frozenset({"llama", "mistral"})

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # Mixture of experts: the router, every expert's matrices stacked [E, rows, cols], a shared expert
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
# GGUF keys transformers' converter leaves out, and the config attribute each sets
_MOE_CONFIG_KEYS = {"expert_feed_forward_length": "moe_intermediate_size",
                    "expert_shared_feed_forward_length": "shared_expert_intermediate_size"}

# Tensors llama.cpp adds that have no HF parameter (llama 3 stores its rope frequencies as a tensor).
_SKIPPED = frozenset({"rope_freqs"})

_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF tensor, or None if it has none we know of."""
    m = _LAYER_RE.match(gguf_name)
    if m:
        layer, part, suffix = m.groups()
        mapped = _LAYER_NAMES.get(part)
        return f"model.layers.{layer}.{mapped}.{suffix}" if mapped else None
    m = _GLOBAL_RE.match(gguf_name)
    if m:
        mapped = _GLOBAL_NAMES.get(m.group(1))
        return f"{mapped}.{m.group(2)}" if mapped else None
    return None


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's `permute`: rows (head, pair, 2) back to (head, 2, pair)."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def open_reader(gguf_file: str) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(gguf_file)
    except Exception as e:  # the reader raises anything from ValueError to numpy errors on a bad file
        raise ModelLoadError(f"cannot parse GGUF file {gguf_file}: {first_line(e)}") from e


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _to_torch(tensor: Any) -> torch.Tensor:
    """A GGUF tensor as a CPU torch tensor in torch's dim order; float formats keep their dtype."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    qtype = tensor.tensor_type
    data = tensor.data
    if qtype == Q.F32:
        out = torch.from_numpy(np.array(data.view(np.float32)))
    elif qtype == Q.F16:
        out = torch.from_numpy(np.array(data.view(np.float16)))
    elif qtype == Q.BF16:
        out = torch.from_numpy(np.array(data.view(np.int16))).view(torch.bfloat16)
    else:
        # Quantized blocks: dequantize to float32 (it is exact for Q8_0/Q4_x: scale * int).
        out = torch.from_numpy(np.ascontiguousarray(dequantize(data, qtype)))
    return out.reshape(shape)


def iter_gguf_weights(gguf_file: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (HF name, CPU tensor) pairs from a GGUF file, dequantized, un-permuted, one at a time."""
    reader = open_reader(gguf_file)
    arch = str(_field(reader, "general.architecture") or "")
    n_head = _field(reader, f"{arch}.attention.head_count")
    n_kv_head = _field(reader, f"{arch}.attention.head_count_kv") or n_head
    permuted = arch in PERMUTED_QK_ARCHS
    if permuted and not n_head:
        raise ModelLoadError(f"GGUF file {gguf_file} has no {arch}.attention.head_count")
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            if tensor.name.split(".")[0] not in _SKIPPED:
                logger.warning(
                    "GGUF %s: skipping tensor %s (no Hugging Face name for it)", gguf_file, tensor.name
                )
            continue
        try:
            weight = _to_torch(tensor)
        except NotImplementedError as e:
            raise ModelLoadError(
                f"GGUF file {gguf_file}: tensor {tensor.name} has unsupported type {tensor.tensor_type.name}"
            ) from e
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = unpermute_qk(weight, int(n_head))
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = unpermute_qk(weight, int(n_kv_head))
        elif name.endswith("shared_expert_gate.weight"):
            weight = weight.reshape(1, -1)  # one output: llama.cpp stores it as a vector
        yield name, weight


# ---- disk cache for slow GGUF conversions (config ~4 s, tokenizer ~4 s) ----


def cache_root() -> Path:
    env = os.environ.get("RADIXSERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "radixserve"


def gguf_cache_dir(gguf_file: str) -> Path:
    """A cache folder unique to this exact file (path, size, mtime) and transformers version."""
    import transformers

    real = os.path.realpath(gguf_file)
    st = os.stat(real)
    ident = f"{real}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}|{_CACHE_FORMAT}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:20]
    return cache_root() / "gguf" / f"{Path(real).stem[:48]}-{key}"


def write_dir_atomically(final: Path, build: Callable[[Path], Any]) -> Path:
    """Build a folder under a temporary name and rename it into place.

    rename() of a folder is atomic, so readers see either nothing or a complete folder. When several
    processes race, the first rename wins and the others find `final` taken and drop their copy.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be readable like any other
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def cached_convert(
    gguf_file: str, what: str, load_cached: Callable[[Path], Any], convert: Callable[[], Any]
) -> Any:
    """Load `what` from the cache if there, else convert it from the GGUF and save it for next time.

    The converted object must have save_pretrained(). A broken or unwritable cache only costs speed.
    """
    try:
        target = gguf_cache_dir(gguf_file) / what
    except OSError as e:
        raise ModelLoadError(f"cannot read GGUF file {gguf_file}: {first_line(e)}") from e
    if target.is_dir():
        try:
            return load_cached(target)
        except Exception as e:  # a cache we cannot read is rebuilt, not fatal
            logger.warning("ignoring unreadable cache %s: %s", target, first_line(e))
    obj = convert()
    try:
        write_dir_atomically(target, obj.save_pretrained)
    except Exception as e:
        logger.warning("could not cache GGUF %s in %s: %s", what, target, first_line(e))
    return obj


def add_moe_fields(cfg: Any, reader: Any) -> None:
    """The expert sizes transformers' GGUF converter drops (it would build experts of its default size),
    and llama.cpp's routing: Qwen3-MoE renormalises its top-k weights, Qwen2-MoE does not."""
    arch = str(_field(reader, "general.architecture") or "")
    for key, attr in _MOE_CONFIG_KEYS.items():
        value = _field(reader, f"{arch}.{key}")
        if value:
            setattr(cfg, attr, int(value))
    if _field(reader, f"{arch}.expert_count"):
        cfg.norm_topk_prob = arch == "qwen3moe"


def load_gguf_config(gguf_file: str, trust_remote_code: bool = False) -> Any:
    """The transformers config of a GGUF file (cached on disk: parsing the file's metadata takes seconds)."""
    from transformers import AutoConfig

    folder, name = os.path.split(os.path.abspath(gguf_file))

    def convert() -> Any:
        try:
            cfg = AutoConfig.from_pretrained(folder, gguf_file=name, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise ModelLoadError(f"cannot parse GGUF file {gguf_file}: {first_line(e)}") from e
        add_moe_fields(cfg, open_reader(gguf_file))
        return cfg

    def load_cached(path: Path) -> Any:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        cfg._name_or_path = folder  # as if read from the GGUF itself
        return cfg

    return cached_convert(gguf_file, "config", load_cached, convert)
