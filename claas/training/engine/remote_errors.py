"""Errors of the cloud SDKs (Tinker, Modal) as 503s whose message says what to do.

`with tinker_errors("phase"):` and `with modal_errors("phase", app_name):` re-raise the SDK's exceptions as
`RemoteEngineError` (503). Anything else passes through unchanged (our own bugs stay 500). The SDKs are imported
lazily: this module is imported by the gateway in every mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator

from claas.errors import UpstreamUnavailableError


class RemoteEngineError(UpstreamUnavailableError):
    """The training/sampling service could not do what was asked; the message says why and what to do."""

    error_type = "engine_unavailable"


class EngineConfigError(ValueError):
    """A remote engine is selected but not configured (a missing key): raised at startup."""


@contextlib.contextmanager
def tinker_errors(phase: str) -> Generator[None, None, None]:
    try:
        yield
    except Exception as exc:
        mapped = _tinker_error(exc, phase)
        if mapped is None:
            raise
        raise mapped from exc


def _tinker_error(exc: Exception, phase: str) -> RemoteEngineError | None:
    try:
        import tinker
    except ImportError:  # pragma: no cover - the tinker engine cannot run without it
        return None
    if not isinstance(exc, tinker.TinkerError):
        return None
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (tinker.AuthenticationError, tinker.PermissionDeniedError)):
        advice = "Tinker refused the API key: check CLAAS_TINKER_API_KEY (it starts with tml-)"
    elif isinstance(exc, (tinker.BillingError, tinker.RateLimitError)):
        advice = "Tinker refused for billing or rate limits: check the account's quota, then retry"
    elif isinstance(exc, tinker.APIConnectionError):
        advice = "Tinker is unreachable: check the network and CLAAS_TINKER_BASE_URL, then retry"
    elif isinstance(exc, tinker.NotFoundError):
        advice = "Tinker does not know this model or checkpoint: check CLAAS_TINKER_BASE_MODEL and the adapter state"
    else:
        advice = "the Tinker request failed; retry, and check Tinker's status if it persists"
    return RemoteEngineError(f"tinker {phase}: {advice} ({detail})")


@contextlib.contextmanager
def modal_errors(phase: str, app_name: str) -> Generator[None, None, None]:
    try:
        yield
    except Exception as exc:
        mapped = _modal_error(exc, phase, app_name)
        if mapped is None:
            raise
        raise mapped from exc


def _modal_error(exc: Exception, phase: str, app_name: str) -> RemoteEngineError | None:
    try:
        import modal.exception as me
    except ImportError:  # pragma: no cover
        return None
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, me.NotFoundError):
        advice = f"the Modal app {app_name!r} is not deployed: run `modal deploy -m claas.deploy`"
    elif isinstance(exc, me.AuthError):
        advice = "Modal has no valid token here: run `modal token new` (or set MODAL_TOKEN_ID / MODAL_TOKEN_SECRET)"
    elif isinstance(exc, me.TimeoutError):
        advice = "the Modal DistillWorker timed out: retry; raise CLAAS_MODAL_TIMEOUT_S for long batches"
    elif isinstance(exc, me.Error):
        advice = "the Modal call failed (worker crash or Modal outage): see `modal app logs claas`, then retry"
    else:
        return None
    return RemoteEngineError(f"modal {phase}: {advice} ({detail})")
