"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause or meet maps to one status and one body here, so the routes
raise (kvloom's own errors, pydantic's ``ValidationError`` or ``OpenAIError``) and never build
error responses themselves. ``param`` names the request field at fault: kvloom's messages
start with it (``tools[0].function.name: ...``), pydantic gives it as a location.

Invariant: no response of the app has another error body. The framework's own errors (no
such route, a method the route lacks, a body that is not UTF-8 JSON, a body too large) and
bugs (a 500 whose text is hidden) are answered here too, by ``install_handlers``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from kvloom.errors import (
    EngineClosedError,
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    InvalidRequestError,
    RequestTimeoutError,
)

logger = logging.getLogger(__name__)

_FIELD_PREFIX = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\]|\.[A-Za-z_]\w*)*): ")
"""A kvloom message's leading field path: ``messages[2].content: ...``, ``response_format: ...``."""


class OpenAIError(Exception):
    """An error the app answers with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers
        """Response headers the status needs (``Allow`` for a 405)."""

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str) -> OpenAIError:
    """A 400 naming ``param``; the message starts with it, as kvloom's own do."""
    return OpenAIError(400, f"{param}: {message}" if param else message, param=param)


def model_not_found(model: str, known: list[str]) -> OpenAIError:
    """OpenAI's 404 for an unknown ``model`` (the served names are listed in the message)."""
    return OpenAIError(404, f"The model `{model}` does not exist (served: {', '.join(known)})",
                       param="model", code="model_not_found")


def field_path(loc: tuple[int | str, ...]) -> str | None:
    """A pydantic location as OpenAI writes a field: ``("messages", 0, "content")`` -> ``messages[0].content``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path or None


def from_validation(errors: list[Any], rename: dict[str, str] | None = None) -> OpenAIError:
    """A 400 for pydantic ``errors()``: the first error's field and message, and how many more
    there were. ``rename`` maps a kvloom field back to the request field the client sent."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return OpenAIError(400, f"The body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    loc = tuple(p for p in first.get("loc", ()) if p != "body")
    if loc and rename and isinstance(loc[0], str):
        loc = (rename.get(loc[0], loc[0]), *loc[1:])
    param = field_path(loc)
    message = str(first.get("msg", "invalid value"))
    if param is None:  # the body as a whole: missing, or not an object
        message = f"The body must be a JSON object with the request's fields ({message})"
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return bad_request(param, message + more)


def from_http(exc: HTTPException, method: str, path: str, endpoints: list[str]) -> OpenAIError:
    """The framework's own errors: no route at ``path`` (404, naming the ``endpoints`` there
    are), a method the route lacks (405, with ``Allow``), a body that could not be read (400,
    saying why: not UTF-8, ...), and any other status with its detail."""
    status = exc.status_code
    if status == 404:
        return OpenAIError(404, f"Invalid URL ({method} {path}): the endpoints are {', '.join(endpoints)}")
    if status == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return OpenAIError(405, f"Method not allowed: {method} {path} (allowed: {allowed})", headers=exc.headers)
    if status == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        return OpenAIError(400, f"The body is not valid JSON: it must be UTF-8 text ({exc.__cause__})")
    if status == 400 and exc.__cause__ is not None:
        return OpenAIError(400, f"The body could not be read: {exc.detail} ({exc.__cause__})")
    kind = "invalid_request_error" if status < 500 else "server_error"
    return OpenAIError(status, str(exc.detail), type=kind, headers=exc.headers)


def from_exception(exc: BaseException, rename: dict[str, str] | None = None, *, log: bool = True) -> OpenAIError:
    """The status and body for anything a request can raise (unknown errors are a 500 that
    hides their text; they are logged unless ``log`` is False, for a caller whose server logs
    them anyway)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ValidationError):
        return from_validation(list(exc.errors()), rename)
    if isinstance(exc, InvalidRequestError):  # GrammarError and AdapterError too
        message = str(exc)
        match = _FIELD_PREFIX.match(message)
        param = match.group(1) if match else None
        if param is not None and rename and param in rename:
            message = rename[param] + message[len(param):]
            param = rename[param]
        return OpenAIError(400, message, param=param)
    if isinstance(exc, EngineOverloadedError):
        return OpenAIError(429, f"The engine is overloaded: {exc}; retry later", type="rate_limit_error",
                           code="rate_limit_exceeded")
    if isinstance(exc, RequestTimeoutError):
        return OpenAIError(504, str(exc), type="timeout_error", code="timeout")
    if isinstance(exc, EngineClosedError | EngineDeadError):
        return OpenAIError(503, f"The engine is not serving: {exc}", type="server_error", code="engine_unavailable")
    if isinstance(exc, EngineError):
        return OpenAIError(500, f"The engine failed: {exc}", type="server_error", code="engine_error")
    if log:
        logger.exception("unexpected error while serving a request", exc_info=exc)
    return OpenAIError(500, f"Internal server error ({type(exc).__name__})", type="server_error")


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def sse_error(error: OpenAIError) -> str:
    """A mid-stream failure as one SSE event (the stream then ends with ``[DONE]``)."""
    return f"data: {json.dumps(error.body())}\n\n"


def endpoints(app: FastAPI, root_path: str = "") -> list[str]:
    """``"METHOD /path"`` for each endpoint of ``app``'s OpenAPI schema (built once, then
    cached by FastAPI), under ``root_path`` (where a parent app mounted it)."""
    paths: dict[str, dict[str, Any]] = app.openapi().get("paths", {})
    return [f"{method.upper()} {root_path}{path}" for path, methods in paths.items() for method in methods]


def install_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's shape: FastAPI's own 422 body validation becomes a 400,
    Starlette's 404/405/400 get OpenAI's body, and an unexpected exception a 500 (Starlette
    re-raises it afterwards, so the server logs it once)."""

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(from_validation(list(exc.errors())))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        listed = endpoints(app, request.scope.get("root_path", ""))
        return error_response(from_http(exc, request.method, request.url.path, listed))

    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(from_exception(exc))

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(from_exception(exc, log=False))

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    for kind in (OpenAIError, ValidationError, InvalidRequestError, EngineOverloadedError, RequestTimeoutError,
                 EngineClosedError, EngineError):
        app.add_exception_handler(kind, on_error)
    app.add_exception_handler(Exception, on_unexpected)
