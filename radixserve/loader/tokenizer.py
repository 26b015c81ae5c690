"""Load a model's tokenizer; a GGUF's tokenizer is converted once and then read from a disk cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from radixserve.loader.errors import ModelLoadError, first_line
from radixserve.loader.gguf import cached_convert
from radixserve.loader.source import ModelSource

logger = logging.getLogger(__name__)


def load_gguf_tokenizer(gguf_file: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer embedded in a GGUF file.

    transformers rebuilds it from the GGUF vocab and merges (~5 s for a 49k vocab), so the result is saved
    with save_pretrained and later processes load that folder instead (well under a second).
    """
    from transformers import AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_file))

    def convert() -> Any:
        try:
            return AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise ModelLoadError(
                f"cannot load the tokenizer of GGUF file {gguf_file}: {first_line(e)}"
            ) from e

    def load_cached(path: Path) -> Any:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)

    return cached_convert(gguf_file, "tokenizer", load_cached, convert)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False) -> Any | None:
    """The tokenizer for `source` (a transformers tokenizer), or None for a dummy model without one."""
    path = source.tokenizer_path
    if path is None:
        return None
    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        return load_gguf_tokenizer(path, trust_remote_code)
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        # weights without a tokenizer (e.g. an architecture for benchmarks): serve token ids only
        logger.warning("no tokenizer files in %s: requests must send input_ids", path)
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {first_line(e)}") from e
