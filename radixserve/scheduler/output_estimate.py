"""How many of a running request's future tokens admission keeps room for.

A request's remaining output is reserved at most `clip` tokens at a time (SGLang does the same), so a
huge max_new_tokens does not keep others out; retraction covers a guess that proves short. The clip
comes from RADIXSERVE_CLIP_MAX_NEW_TOKENS_ESTIMATION, or SGLang's SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION
so its recipes carry over.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

DEFAULT_CLIP_MAX_NEW_TOKENS = 4096
CLIP_ENV_NAMES = ("RADIXSERVE_CLIP_MAX_NEW_TOKENS_ESTIMATION", "SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION")


def clip_from_env(environ: Mapping[str, str] = os.environ) -> int:
    for name in CLIP_ENV_NAMES:
        value = environ.get(name)
        if value is None:
            continue
        try:
            clip = int(value)
        except ValueError:
            clip = 0
        if clip <= 0:
            raise ValueError(f"{name} must be a positive number of tokens, got {value!r}")
        return clip
    return DEFAULT_CLIP_MAX_NEW_TOKENS
