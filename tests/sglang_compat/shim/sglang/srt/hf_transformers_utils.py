"""Older import path of get_tokenizer (sglang.srt.hf_transformers_utils)."""

from sglang.srt.utils.hf_transformers_utils import get_tokenizer  # noqa: F401
