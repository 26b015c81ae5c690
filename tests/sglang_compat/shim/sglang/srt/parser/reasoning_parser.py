"""sglang.srt.parser.reasoning_parser: radixserve has no reasoning parser; building one fails loudly."""

from __future__ import annotations


class ReasoningParser:
    def __init__(self, model_type: str | None = None, *args, **kwargs) -> None:
        raise NotImplementedError(
            f"reasoning parser {model_type!r}: radixserve has no reasoning parsers (out of scope)"
        )
