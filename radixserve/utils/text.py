"""Checks on client text shared by the HTTP schemas, the tokenizer manager and SamplingParams."""

from __future__ import annotations


def lone_surrogate_at(text: str) -> int | None:
    """Position of the first lone UTF-16 surrogate (JSON "\\ud800" parses to one), or None. Such text
    is not valid Unicode: it cannot be encoded to UTF-8, so no tokenizer or stop checker can take it."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return e.start
