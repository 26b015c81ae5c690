"""Model loading: resolve a model path, read its config, stream its weights, load its tokenizer."""

from __future__ import annotations

from radixserve.loader.dummy import init_dummy_weights
from radixserve.loader.errors import ModelLoadError
from radixserve.loader.source import ModelSource, resolve_model_source
from radixserve.loader.tokenizer import load_tokenizer
from radixserve.loader.weights import iter_weights

__all__ = [
    "ModelLoadError",
    "ModelSource",
    "init_dummy_weights",
    "iter_weights",
    "load_tokenizer",
    "resolve_model_source",
]
