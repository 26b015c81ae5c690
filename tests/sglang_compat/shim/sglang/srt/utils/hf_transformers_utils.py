"""sglang.srt.utils.hf_transformers_utils: get_tokenizer for the model radixserve serves."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any


@functools.cache
def _load(path: str | None) -> Any:
    if path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    from radixserve.loader.bundled import bundled_gguf_path
    from radixserve.loader.tokenizer import load_gguf_tokenizer

    return load_gguf_tokenizer(bundled_gguf_path())


def get_tokenizer(tokenizer_name: str, *args: Any, **kwargs: Any) -> Any:
    """The tokenizer of the model the harness serves.

    The server the shim starts always serves radixserve's bundled SmolLM2 (or SGLANG_COMPAT_MODEL_PATH when
    set), whatever model name the test asks for, so the tokenizer must be that model's too.
    """
    from sglang.test.test_utils import resolve_model

    path, note = resolve_model(tokenizer_name)
    if note:
        print(f"[sglang-compat] get_tokenizer: {note}", file=sys.stderr, flush=True)
    return _load(path if path and os.path.exists(path) else None)
