"""sglang.srt.sampling.custom_logit_processor: only what a test needs to build a request.

A test subclasses CustomLogitProcessor and sends `to_str()` in the request body; whether the server runs it
is the server's business (radixserve has no custom logit processors). The string is JSON with the class's
qualified name and, when the class can be pickled, its pickle in hex.
"""

from __future__ import annotations

import json
import pickle
from typing import Any


class CustomLogitProcessor:
    def __call__(self, logits: Any, custom_param_list: list[dict[str, Any]] | None = None) -> Any:
        raise NotImplementedError

    @classmethod
    def to_str(cls) -> str:
        payload: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}"}
        try:
            payload["callable"] = pickle.dumps(cls).hex()
        except Exception:  # a class defined inside a function cannot be pickled by reference
            payload["callable"] = None
        return json.dumps(payload)
