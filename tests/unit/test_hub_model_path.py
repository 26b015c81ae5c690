"""--model-path as a Hugging Face Hub id (owner/name), resolved from the HF cache offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from radixserve.loader import ModelLoadError, resolve_model_source
from radixserve.loader.source import looks_like_hub_id
from tests.helpers import make_tiny_model


def hub_cache_with(src: Path, cache: Path, repo_id: str) -> Path:
    """An HF cache (the layout huggingface_hub writes) holding src as repo_id's main revision."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(src, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_resolves_from_the_hf_cache(tmp_path: Path, monkeypatch) -> None:
    """--model-path owner/name (the runbook's form) loads from the HF cache, offline, as SGLang does;
    an id that is neither local nor in the cache fails in one line naming it."""
    import huggingface_hub.constants as hub_constants

    make_tiny_model("llama", str(tmp_path / "src"), tokenizer=False)
    snapshot = hub_cache_with(tmp_path / "src", tmp_path / "hub", "acme/tiny-llama")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    for load_format in ("auto", "dummy"):
        src = resolve_model_source("acme/tiny-llama", load_format)
        assert Path(src.model_path) == snapshot and src.kind == ("hf" if load_format == "auto" else "dummy")
    with pytest.raises(ModelLoadError, match="'acme/missing' is not a local path"):
        resolve_model_source("acme/missing")
    assert looks_like_hub_id("meta-llama/Llama-3.1-8B-Instruct")
    assert not any(map(looks_like_hub_id, ["./a/b", "/a/b", "a/b/c", "a", "../x", "~/x"]))
