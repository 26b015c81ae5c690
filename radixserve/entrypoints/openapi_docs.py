"""What /openapi.json says each route answers: the real response bodies and the real error codes.

The handlers write their JSON themselves (orjson, no response_model on the hot path), so FastAPI
cannot see the bodies; these models describe them for the document only. FastAPI would also list
422 for every body it validates, while radixserve answers 400 (the OpenAI convention): install()
rewrites each operation's error responses to the codes the server really sends.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """The OpenAI error envelope, for every error status."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # always null: no reasoning parser


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class GenerateResponse(BaseModel):
    """One result of /generate (a list of them for a batch or n > 1)."""

    text: str
    output_ids: list[int]
    meta_info: dict[str, Any]


class ModelInfo(BaseModel):
    model_path: str
    tokenizer_path: str | None = None
    is_generation: bool
    preferred_sampling_params: dict[str, Any] | None = None
    weight_version: str
    has_image_understanding: bool
    has_audio_understanding: bool
    served_model_name: str
    context_length: int


class DPLoad(BaseModel):
    dp_rank: int
    num_reqs: int
    num_waiting_reqs: int
    num_tokens: int


class TokenizeResponse(BaseModel):
    tokens: list[int] | list[list[int]]  # lists for a list of texts
    count: int | list[int]
    max_model_len: int


class DetokenizeResponse(BaseModel):
    text: str | list[str]  # a list for a list of id lists


def json_body(model: Any, description: str = "Success") -> dict[str, Any]:
    return {200: {"model": model, "description": description}}


def text_body(description: str, media_type: str = "text/plain") -> dict[str, Any]:
    return {200: {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}}


def streamable(model: Any, description: str) -> dict[str, Any]:
    """JSON, or with "stream": true server-sent events (`data: {...}` lines, then `data: [DONE]`)."""
    return {200: {"model": model, "description": description,
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


_ERROR_TEXT = {
    400: "Invalid request: malformed JSON, a wrong field, a prompt past the context length",
    401: "Missing or wrong API key (--api-key)",
    404: "Unknown model",
    408: "The request's body did not arrive in time (--http-body-timeout)",
    413: "Body larger than --max-request-body-size",
    500: "A bug of radixserve",
    503: "The server is starting or shutting down, or stopped the request (--shutdown-timeout)",
}


def _error_codes(path: str, method: str) -> list[int]:
    """The error statuses a route can answer with (GateMiddleware, the handlers, the body checks)."""
    codes = {500}
    if path != "/metrics":
        codes.add(503)  # starting or draining (/health says so too)
    if not path.startswith(("/health", "/metrics")):
        codes.add(401)  # with --api-key
    if method == "post":
        codes |= {400, 408, 413}
    if path in ("/flush_cache", "/start_profile", "/stop_profile"):
        codes.add(400)  # while requests run; a profile already running, or none
    if path in ("/v1/completions", "/v1/chat/completions", "/v1/models/{model_id}"):
        codes.add(404)  # a model other than the served one
    return sorted(codes)


def install(app: FastAPI) -> None:
    """Serve an /openapi.json whose error responses are the ones radixserve sends."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(components["ErrorResponse"].pop("$defs", {}))
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        ref = {"$ref": "#/components/schemas/ErrorResponse"}
        for path, methods in schema.get("paths", {}).items():
            for method, operation in methods.items():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for code in _error_codes(path, method):
                    responses[str(code)] = {"description": _ERROR_TEXT[code],
                                            "content": {"application/json": {"schema": ref}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
