"""Talking to workers: the headers passed on, retry pacing, and the error envelope the router
answers with (the client itself is http_client.py)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import orjson
from starlette.responses import Response

from radixserve.entrypoints.errors import error_body

RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
# request headers not passed on: hop-by-hop ones, and those the client library sets itself
DROPPED_HEADERS = frozenset({"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te",
                             "upgrade", "proxy-authorization", "proxy-connection", "accept-encoding"})


def forward_headers(headers: Mapping[str, str], request_id: str) -> dict[str, str]:
    out = {k: v for k, v in headers.items() if k.lower() not in DROPPED_HEADERS}
    out["x-request-id"] = request_id
    return out


RESPONSE_HEADERS_DROPPED = frozenset({"content-length", "connection", "keep-alive", "transfer-encoding", "date",
                                      "server", "content-type"})


def answer_headers(upstream: Mapping[str, str], request_id: str) -> dict[str, str]:
    """A worker's response headers as the router passes them on (its own hop-by-hop ones dropped)."""
    out = {k: v for k, v in upstream.items() if k.lower() not in RESPONSE_HEADERS_DROPPED}
    out["x-request-id"] = request_id
    return out


@dataclass
class Answer:
    """What the router sends back for a serving request: a body, or a stream of chunks."""

    status: int
    body: bytes = b""
    media_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    stream: AsyncIterator[bytes] | None = None


def error_answer(status: int, message: str, request_id: str | None = None) -> Answer:
    return Answer(status, orjson.dumps(error_body(status, message)),
                  headers={"x-request-id": request_id} if request_id else {})


def error_response(status: int, message: str, request_id: str | None = None) -> Response:
    headers = {"x-request-id": request_id} if request_id else None
    return Response(orjson.dumps(error_body(status, message)), status_code=status, media_type="application/json",
                    headers=headers)


def error_chunk(status: int, message: str) -> bytes:
    """An SSE event carrying an error, then the end of the stream."""
    return b"data: " + orjson.dumps(error_body(status, message)) + b"\n\ndata: [DONE]\n\n"


def backoff_seconds(retry: int, initial_ms: float, max_ms: float, multiplier: float, jitter: float) -> float:
    """Wait before retry number `retry` (1 for the first): exponential, capped, with jitter."""
    base = min(max_ms, initial_ms * multiplier ** (retry - 1))
    return max(0.0, base * (1.0 + jitter * random.uniform(-1.0, 1.0))) / 1000.0
