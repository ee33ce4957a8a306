"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause or meet maps to one status and one body here, so the routes
raise (kvloom's own errors, pydantic's ``ValidationError`` or ``OpenAIError``) and never build
error responses themselves. ``param`` names the request field at fault: kvloom's messages
start with it (``tools[0].function.name: ...``), pydantic gives it as a location.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

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
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

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
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return bad_request(param, message + more)


def from_exception(exc: BaseException, rename: dict[str, str] | None = None) -> OpenAIError:
    """The status and body for anything a request can raise (unknown errors are a 500 that
    hides their text; they are logged)."""
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
    logger.exception("unexpected error while serving a request", exc_info=exc)
    return OpenAIError(500, f"Internal server error ({type(exc).__name__})", type="server_error")


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def sse_error(error: OpenAIError) -> str:
    """A mid-stream failure as one SSE event (the stream then ends with ``[DONE]``)."""
    return f"data: {json.dumps(error.body())}\n\n"


def install_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's shape: FastAPI's own 422 body validation becomes a 400."""

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(from_validation(list(exc.errors())))

    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(from_exception(exc))

    app.add_exception_handler(RequestValidationError, on_validation)
    for kind in (OpenAIError, ValidationError, InvalidRequestError, EngineOverloadedError, RequestTimeoutError,
                 EngineClosedError, EngineError):
        app.add_exception_handler(kind, on_error)
