"""The errors a request can meet on its way from the HTTP layer (or Engine) to the scheduler."""

from __future__ import annotations

from radixserve.utils.text import lone_surrogate_at


class RequestError(ValueError):
    """The request is invalid (HTTP 400). The message names the field; `param` is its name when
    the error is about one field (the native name: the OpenAI handlers rename it)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def check_text(text: str, field: str) -> None:
    """A lone UTF-16 surrogate (JSON "\\ud800") is not text the tokenizer can encode: refuse it as
    the client's error. The HTTP schemas refuse it first; this guards every other way in (Engine)."""
    at = lone_surrogate_at(text)
    if at is not None:
        raise RequestError(
            f"{field} has a lone UTF-16 surrogate ({text[at]!r}) at position {at}, which is not "
            "valid Unicode text", field,
        )


class ServerDeadError(RuntimeError):
    """A server process died; no request can be served."""


class RequestAborted(RuntimeError):
    """The server ended the request before it finished (the shutdown timeout; no KV memory left):
    an error with its own status code (503), not a result, on every endpoint."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
