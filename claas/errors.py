"""The one error channel: typed exceptions with a status code, and the handlers that render them.

Services raise a `ClaasError` subclass; `install_error_handlers(app)` (called by `build_app`) renders every error the
same way, OpenAI's shape, which the official clients parse:

    {"error": {"message": "...", "type": "...", "param": null | "field", "code": <http status>}}

`type` is one of OpenAI's error types, chosen by the status alone (`openai_error_type`), on every route and for
errors relayed from the inference server too: `invalid_request_error` (400, 404, 409, 413, 422),
`authentication_error` (401), `permission_error` (403), `rate_limit_error` (429), `server_error` (5xx). A 5xx
message names what failed (the phase, the upstream URL), never exception text or file paths; those go to the log.

Validation errors are 400 on the OpenAI-compatible routes (as OpenAI and vLLM answer) and 422 naming the field on
CLaaS's own routes. The adapter store's exceptions (`claas.training.storage`) are mapped here too.

Not here: retry policy or logging of business events; services decide what to raise, this module only renders.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from claas.core.lora_ids import InvalidLoraIdError

logger = logging.getLogger(__name__)

#: Routes that answer validation errors like OpenAI / vLLM (400) rather than like CLaaS's own API (422).
OPENAI_COMPATIBLE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/score", "/v1/models"})


def openai_error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status: the one vocabulary of every error body this API sends."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


class ClaasError(Exception):
    """Base of every error a service raises on purpose. Subclasses fix `status_code`; the body's `type` follows
    from it (`openai_error_type`)."""

    status_code: int = 500

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> dict[str, str] | None:
        return None

    @property
    def error_type(self) -> str:
        return openai_error_type(self.status_code)

    def to_body(self) -> dict[str, Any]:
        return error_body(self.message, self.status_code, param=self.param)


class InvalidRequestError(ClaasError):
    status_code = 400


class UnauthorizedError(ClaasError):
    status_code = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class ForbiddenError(ClaasError):
    status_code = 403


class NotFoundError(ClaasError):
    status_code = 404


class ConflictError(ClaasError):
    status_code = 409


class PayloadTooLargeError(ClaasError):
    status_code = 413


class UnprocessableError(ClaasError):
    status_code = 422


class UpstreamUnavailableError(ClaasError):
    """The inference server could not be reached; the message names the URL that failed."""

    status_code = 503


class UpstreamTimeoutError(UpstreamUnavailableError):
    status_code = 504


class UpstreamError(ClaasError):
    """The inference server answered with an error: its status, message and param are relayed; `upstream_type`
    keeps the server's own type name (vLLM's `BadRequestError`) for logs, the body carries OpenAI's."""

    def __init__(
        self, status_code: int, message: str, *, upstream_type: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message, param=param)
        self.status_code = status_code
        self.upstream_type = upstream_type


class PhaseFailedError(ClaasError):
    """A step of a multi-phase operation (the feedback transaction) failed; the message names the phase and, for a
    ClaasError cause, its message. An unexpected exception's text stays in the log (it may hold paths)."""

    def __init__(self, phase: str, cause: BaseException | str, *, status_code: int = 500, ref: str | None = None):
        if isinstance(cause, ClaasError):
            detail = cause.message
        elif isinstance(cause, str):
            detail = cause
        else:
            detail = "internal error" + (f"; see the server log for request {ref}" if ref else "; see the server log")
        super().__init__(f"phase '{phase}' failed: {detail}")
        self.phase = phase
        self.cause = cause
        self.status_code = status_code


class ServingStaleError(ClaasError):
    """The update is saved (the adapter on disk has the new step) but the inference server still serves the previous
    version: the reload failed after retries. 503 + Retry-After; a retry with the same Idempotency-Key only reloads,
    a retry without one would train the step again."""

    status_code = 503

    def __init__(self, lora_id: str, step: int, cause: str, *, result: dict[str, Any] | None = None) -> None:
        super().__init__(
            f"the update of {lora_id!r} is saved (step {step}) but loading it on the inference server failed "
            f"({cause}), so the server may serve the previous version until it is loaded; retry with the same "
            "Idempotency-Key to reload without training again"
        )
        self.lora_id = lora_id
        self.step = step
        self.result = result

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "2"}


def error_body(message: str, code: int, *, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": openai_error_type(code), "param": param, "code": code}}


#: JSON schema of `error_body`, the one shape of every 4xx/5xx this API sends.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "enum": ["invalid_request_error", "authentication_error",
                                                    "permission_error", "rate_limit_error", "server_error"]},
                "param": {"type": ["string", "null"]},
                "code": {"type": "integer"},
            },
        }
    },
}

#: `responses=` of the app: every route documents the error shape for 4XX and 5XX as JSON, also routes that answer
#: HTML (an explicit `content`, so FastAPI does not put it under the route's own media type); this also replaces
#: FastAPI's default 422 `HTTPValidationError`, which this API never sends.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"description": "The request cannot be served as sent (the field in `param`).",
            "content": {"application/json": {"schema": ERROR_SCHEMA}}},
    "5XX": {"description": "An upstream or a phase of the operation failed.",
            "content": {"application/json": {"schema": ERROR_SCHEMA}}},
}


def error_response(exc: ClaasError) -> JSONResponse:
    return JSONResponse(exc.to_body(), status_code=exc.status_code, headers=exc.headers())


def parse_upstream_error(status_code: int, content: bytes) -> tuple[str, str | None, str | None]:
    """(message, type, param) from an upstream error body: `{"error": {...}}`, flat `{"object": "error", ...}`,
    FastAPI's `{"detail": ...}`, or plain text."""
    text = content.decode("utf-8", errors="replace").strip()
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict):
            body = inner
        elif isinstance(inner, str):  # some servers send {"error": "message"}
            body = {"message": inner}
        if "message" in body:
            param = body.get("param")
            return str(body["message"]), body.get("type"), param if isinstance(param, str) else None
        if "detail" in body:
            return _detail_message(body["detail"]), None, None
    return text or f"HTTP {status_code} with an empty body", None, None


def _detail_message(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(_format_validation_error(err) for err in detail if isinstance(err, dict))
    return str(detail)


def _field_name(loc: Sequence[Any]) -> str:
    parts = list(loc)
    if len(parts) > 1 and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(str(part) for part in parts)


def _error_field(err: dict[str, Any]) -> str:
    """The field an error is about; none for a body that is not valid JSON (its loc is a character offset)."""
    if err.get("type") == "json_invalid":
        return ""
    return _field_name(err.get("loc", ()))


def _format_validation_error(err: dict[str, Any]) -> str:
    field = _error_field(err)
    msg = str(err.get("msg", "invalid value"))
    if err.get("type") == "json_invalid":
        ctx = err.get("ctx") or {}
        detail = f" ({ctx['error']})" if isinstance(ctx, dict) and ctx.get("error") else ""
        return f"the request body is not valid JSON{detail}"
    return f"{field}: {msg}" if field else msg


def validation_error_body(errors: Sequence[Any], *, status_code: int) -> dict[str, Any]:
    """One message for all errors; `param` is the first failing field (loc joined with '.')."""
    errs = [err for err in errors if isinstance(err, dict)]
    message = "; ".join(_format_validation_error(err) for err in errs) or "invalid request"
    param = _error_field(errs[0]) if errs else None
    return error_body(message, status_code, param=param or None)


async def _pydantic_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A model validated inside a handler (not by FastAPI) failed: the caller's input, so a 4xx naming the field."""
    assert isinstance(exc, pydantic.ValidationError)
    status = 400 if request.url.path in OPENAI_COMPATIBLE_PATHS else 422
    return JSONResponse(validation_error_body(exc.errors(), status_code=status), status_code=status)


async def _claas_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ClaasError)
    if exc.status_code >= 500:
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, exc.message)
    return error_response(exc)


async def _validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    status = 400 if request.url.path in OPENAI_COMPATIBLE_PATHS else 422
    return JSONResponse(validation_error_body(exc.errors(), status_code=status), status_code=status)


async def _http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    body = error_body(str(exc.detail), exc.status_code)
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    # The exception's text may hold paths or data: it goes to the log above, not to the caller.
    body = error_body(f"internal error while handling {request.method} {request.url.path}; see the server log", 500)
    return JSONResponse(body, status_code=500)


def _storage_error_map() -> dict[type[Exception], tuple[type[ClaasError], str | None]]:
    """The adapter store's exceptions and the ClaasError each one becomes. Imported here, not at module level, so
    that the serving side (proxy, routes) does not load the training store by importing this module."""
    from claas.training.storage import LoraExistsError, LoraLockTimeoutError, LoraNotFoundError

    return {
        LoraNotFoundError: (NotFoundError, "lora_id"),
        InvalidLoraIdError: (UnprocessableError, "lora_id"),
        LoraExistsError: (ConflictError, "lora_id"),
        LoraLockTimeoutError: (ConflictError, "lora_id"),
    }


def as_claas_error(exc: BaseException) -> ClaasError | None:
    """The ClaasError an exception is rendered as, or None for an unexpected error (a bug: 500)."""
    if isinstance(exc, ClaasError):
        return exc
    for source, (target, param) in _storage_error_map().items():
        if isinstance(exc, source):
            return target(str(exc), param=param)
    return None


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ClaasError, _claas_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(pydantic.ValidationError, _pydantic_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(Exception, _unhandled_error_handler)
    for source, (target, param) in _storage_error_map().items():

        async def _storage_handler(request: Request, exc: Exception, _t=target, _p=param) -> JSONResponse:
            return error_response(_t(str(exc), param=_p))

        app.add_exception_handler(source, _storage_handler)
