"""Every error the server returns, in the OpenAI shape, with the right status and no traceback.

OpenAI clients parse ``{"error": {"message", "type", "param", "code"}}`` and raise a typed
exception per status (``NotFoundError`` for 404, ``AuthenticationError`` for 401...), so the
status matters as much as the body. Policy:

- 400: a value out of range, a request the engine refuses (prompt longer than the context), JSON of
  the wrong shape (missing field, wrong type: ``param`` names the field, as OpenAI and vLLM answer,
  not FastAPI's 422), and a body that is not JSON at all;
- 401: missing or wrong API key; 403: runtime loading while it is switched off;
- 404: unknown model (the message lists the available ones) or route;
- 413: body larger than the limit;
- 503: engine queue full or shutting down (with ``Retry-After``);
- 500: only for faults of the server itself; logged with the traceback, which never leaves it.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error with its HTTP status, raised anywhere in a route and rendered by the handler."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        logged: bool = False,
    ) -> None:
        super().__init__(message)
        self.logged = logged  # already logged where it arose (the one line a client error gets)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, code=self.code, param=self.param)


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object (also sent as one SSE event when a stream fails midway)."""
    kind = _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ErrorJSONResponse(JSONResponse):
    """ASCII-escaped JSON: an error may quote client text holding a lone surrogate, which UTF-8 cannot encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, **kwargs: Any) -> JSONResponse:
    headers = kwargs.pop("headers", None)
    return ErrorJSONResponse(error_body(status, message, **kwargs), status_code=status, headers=headers)


def _describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """``[{'loc': ('body', 'messages', 0, 'role'), 'msg': ...}]`` -> ("messages.0.role: Field required", "messages.0.role").

    Union members add their type to the location (``prompt.str``, ``prompt.list[int]``): dropped."""
    parts, first_param = [], None
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body" and not _is_type_tag(x)]
        where = ".".join(loc) or "body"
        first_param = first_param or (where if loc else None)
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more, first_param


def _is_type_tag(x: Any) -> bool:
    return isinstance(x, str) and (x in {"str", "int", "float", "bool", "none"} or "[" in x or x.startswith("function-"))


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    if exc.status < 500 and not exc.logged:
        logger.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message[:300])
    return ErrorJSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "request body is not valid JSON; send a JSON object with Content-Type: application/json",
                              code="invalid_json")
    message, param = _describe_validation(errors)
    return error_response(400, f"invalid request body: {message}", code="invalid_body", param=param)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; see GET /v1/models, POST /v1/completions, POST /v1/chat/completions"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("internal error on %s %s", request.method, request.url.path)
    return error_response(500, "internal server error; the server log has the details", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
