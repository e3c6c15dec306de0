"""Typed errors of the model server and their vLLM-shaped JSON bodies.

Services raise one of the `ModelServerError` subclasses; `app.py` has one handler that turns any of them into vLLM's
newer error shape `{"error": {"message", "type", "param", "code"}}` with the HTTP status equal to `code`. The `type`
strings are the ones vLLM uses (`BadRequestError`, `NotFoundError`, `InvalidUserInput`, ...), so a gateway written
against vLLM cannot tell the two servers apart.

Not here: the FastAPI wiring (see `app.py`), request validation rules (see `protocol.py` and `sampling.py`).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


class ModelServerError(Exception):
    """Base class: an error that maps to one HTTP status and one vLLM error `type`."""

    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    err_type: str = "InternalServerError"

    def __init__(self, message: str, *, param: str | None = None, err_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if err_type is not None:
            self.err_type = err_type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.err_type, self.status, self.param)


class BadRequest(ModelServerError):
    """The caller's mistake (vLLM: `VLLMValidationError` / `ValueError` → 400 `BadRequestError`)."""

    status = HTTPStatus.BAD_REQUEST
    err_type = "BadRequestError"


class NotFound(ModelServerError):
    status = HTTPStatus.NOT_FOUND
    err_type = "NotFoundError"


class Unavailable(ModelServerError):
    """The engine cannot serve right now (asleep, shutting down)."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    err_type = "ServiceUnavailableError"


class InternalError(ModelServerError):
    """Our own bug; the only 5xx besides `Unavailable`."""


def error_body(message: str, err_type: str, status: HTTPStatus | int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": int(status)}}


def model_not_found(model: str | None) -> NotFound:
    # Same text as vLLM's OpenAIServing._check_model.
    return NotFound(f"The model `{model}` does not exist.", param="model")


def too_many_logprobs(kind: str, requested: int, allowed: int, param: str) -> BadRequest:
    # Same text as vLLM's InputProcessor._validate_logprobs ("sample" or "prompt").
    return BadRequest(
        f"Requested {kind} logprobs of {requested}, which is greater than max allowed: {allowed}", param=param
    )
