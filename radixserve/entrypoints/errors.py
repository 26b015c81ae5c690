"""The OpenAI error envelope and the status code of each kind of failure."""

from __future__ import annotations

import logging
from http import HTTPStatus

import orjson
from fastapi.responses import JSONResponse


class JSONBytes(JSONResponse):
    """JSON rendered with orjson (fast, and no deprecated response class needed). A JSONResponse, so
    that /openapi.json documents the bodies as JSON."""

    def render(self, content: object) -> bytes:
        return orjson.dumps(content)

logger = logging.getLogger("radixserve.http")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_")),
            "param": param,
            "code": code if code is not None else status,
        }
    }


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   quiet: bool = False) -> JSONBytes:
    level = logging.DEBUG if quiet else logging.ERROR if status >= 500 else logging.INFO
    logger.log(level, "error %d: %s", status, message)
    return JSONBytes(error_body(status, message, param, code), status_code=status)
