"""Every failure as an OpenAI error envelope with its status code: the app's exception handlers."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from radixserve.entrypoints.errors import APIError, error_response
from radixserve.entrypoints.openai_common import ClientDisconnected, as_api_error
from radixserve.entrypoints.openai_protocol import MODEL_NAMES, InvalidText
from radixserve.entrypoints.request_errors import RequestAborted, ServerDeadError

logger = logging.getLogger("radixserve.http")


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    for err in errors:
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidText):
            return str(cause), cause.param
    # A union field fails once per member, each located through the member's name
    # (content.list[ContentPart].0.text): of the first field's errors, report the one that got
    # deepest into the value, without the member names.
    field = _field_path(first)[:1]
    same_field = [e for e in errors if _field_path(e)[:1] == field]
    best = max(same_field, key=lambda e: len(_field_path(e)))
    param = ".".join(_field_path(best)) or None
    return f"{param or 'body'}: {best.get('msg', 'invalid value')}", param


_TYPE_NAMES = {"str", "int", "float", "bool", "none", "dict", "list"}


def _field_path(err: dict[str, Any]) -> list[str]:
    """An error's location in the body, without pydantic's union-member names."""
    return [str(x) for x in err.get("loc", ()) if x != "body" and not (
        isinstance(x, str) and (x in _TYPE_NAMES or x in MODEL_NAMES or "[" in x))]


async def _api_error(_: Request, e: APIError) -> Response:
    return error_response(e.status, e.message, e.param, e.code)


async def _validation(_: Request, e: RequestValidationError) -> Response:
    message, param = validation_message(e)
    return error_response(400, message, param)


async def _http(_: Request, e: StarletteHTTPException) -> Response:
    if e.status_code == 404:
        return error_response(404, "not found: no such route")
    response = error_response(e.status_code, str(e.detail))
    response.headers.update(e.headers or {})  # 405's Allow
    return response


async def _value(_: Request, e: ValueError) -> Response:
    err = as_api_error(e)
    return error_response(err.status, err.message, err.param)


async def _gone(request: Request, _: ClientDisconnected) -> Response:
    # nobody reads this answer; the requests are aborted already (until_disconnect)
    logger.info("client disconnected from %s before the answer; its requests were aborted", request.url.path)
    return Response(status_code=499)


async def _dead(_: Request, e: ServerDeadError) -> Response:
    return error_response(503, str(e))


async def _aborted(_: Request, e: RequestAborted) -> Response:
    return error_response(e.status, e.message)


async def _bug(_: Request, e: Exception) -> Response:
    logger.exception("internal error")
    return error_response(500, f"internal error: {type(e).__name__}: {e}")


def install_error_handlers(app: FastAPI) -> None:
    for exc, handler in ((APIError, _api_error), (RequestValidationError, _validation),
                         (StarletteHTTPException, _http), (ValueError, _value), (ClientDisconnected, _gone),
                         (ServerDeadError, _dead), (RequestAborted, _aborted), (Exception, _bug)):
        app.add_exception_handler(exc, handler)
