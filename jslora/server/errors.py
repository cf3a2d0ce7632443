"""OpenAI-format errors: every refusal of the server is one of these, never a plain-text 500."""
from __future__ import annotations

import json

from fastapi.responses import JSONResponse

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 500: "internal_error", 503: "server_overloaded"}


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate a client sent (and an error message echoes) cannot
    be encoded as UTF-8, and must not turn a 400 into a 500."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.type = type_ or ERROR_TYPES.get(status, "server_error")


def error_body(status: int, message: str, type_: str | None = None, param=None) -> dict:
    return {"error": {"message": message, "type": type_ or ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": status}}


def error_response(status: int, message: str, type_: str | None = None, param=None, headers=None) -> JSONResponse:
    return AsciiJSONResponse(error_body(status, message, type_, param), status_code=status, headers=headers)


def check_text(field: str, text: str) -> str:
    """Refuse text that is not valid Unicode (a lone surrogate such as "\\ud800" survives JSON parsing)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{field} is not valid Unicode (it holds a lone surrogate)", param=field) from None
    return text
