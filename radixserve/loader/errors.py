"""The one error type the loader raises for a model it cannot use."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model, config, weight or tokenizer file cannot be used. The message is one line naming the path."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's text, so wrapped errors stay one line."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
