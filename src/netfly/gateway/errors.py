"""OpenAI-style error bodies, and the HTTP status each error maps to.

Before a stream starts an error becomes ``{"error": {message, type, param, code}}`` with a status;
after it started, the same object is sent as one ``data:`` event (see :mod:`.app`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import (
    AuthenticationError,
    ConfigurationError,
    LocalServerError,
    ModelNotSupportedError,
    NetflyError,
    NetflyTimeoutError,
    RateLimitError,
    ResponseStatusError,
    TransportError,
    UpstreamError,
)


class GatewayError(Exception):
    """A request the gateway itself refuses (bad input, missing token, body too large)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,  # seconds, sent as Retry-After
    ) -> None:
        self.status = status
        self.retry_after = retry_after
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        super().__init__(message)


@dataclass(frozen=True)
class ErrorInfo:
    """What the client is told about an error."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    retry_after: float | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(0, math.ceil(self.retry_after)))
        if self.status == 401 and self.type == "authentication_error" and self.code == "invalid_api_key":
            headers["WWW-Authenticate"] = "Bearer"
        return headers


def describe(error: BaseException) -> ErrorInfo:
    """The status and OpenAI-style error for ``error``.

    Client mistakes are 400; upstream refusals keep their meaning (401, 404, 429); an upstream that
    failed or could not be reached is 502; an upstream that was too slow is 504; the local model's
    server crashed (or is not restarted for now: ``Retry-After``) is 503. Anything else is a bug of
    the gateway: 500 with no details (the caller logs the traceback).
    """
    if isinstance(error, GatewayError):
        return ErrorInfo(error.status, error.message, error.type, error.param, error.code, error.retry_after)
    if isinstance(error, ModelNotSupportedError):
        return ErrorInfo(400, str(error), "invalid_request_error", "model", "model_not_found")
    if isinstance(error, ConfigurationError):
        return ErrorInfo(400, str(error), "invalid_request_error", error.param)
    if isinstance(error, RateLimitError):
        return ErrorInfo(429, str(error), "rate_limit_error", None, "rate_limit_exceeded", error.retry_after)
    if isinstance(error, AuthenticationError):
        # The upstream refused the gateway's own credentials; the client can do nothing but report it.
        return ErrorInfo(401, f"the upstream provider refused the gateway's credentials: {error}",
                         "authentication_error", None, "upstream_authentication_failed")
    if isinstance(error, ResponseStatusError):
        return _describe_status(error)
    if isinstance(error, LocalServerError):
        return ErrorInfo(503, str(error), "server_error", None, "local_model_unavailable", error.retry_after)
    if isinstance(error, NetflyTimeoutError):
        return ErrorInfo(504, str(error), "timeout_error", None, "upstream_timeout")
    if isinstance(error, TransportError):
        return ErrorInfo(502, str(error), "upstream_error", None, "upstream_unreachable")
    if isinstance(error, UpstreamError):
        # The engine scrubbed these of the call's secrets; only plain strings are relayed.
        code = error.code if isinstance(error.code, str) else None
        kind = error.type if isinstance(error.type, str) and error.type else "upstream_error"
        param = error.param if isinstance(error.param, str) else None
        return ErrorInfo(502, str(error), kind, param, code)
    if isinstance(error, NetflyError):
        return ErrorInfo(502, str(error), "upstream_error")
    return ErrorInfo(500, "internal error of the gateway", "server_error")


def _describe_status(error: ResponseStatusError) -> ErrorInfo:
    status = error.status
    if status == 404:
        return ErrorInfo(404, str(error), "not_found_error", None, "not_found")
    if status in (408, 504):
        return ErrorInfo(504, str(error), "timeout_error", None, "upstream_timeout")
    if 400 <= status < 500:
        return ErrorInfo(400, str(error), "invalid_request_error")
    return ErrorInfo(502, str(error), "upstream_error", None, "upstream_status_error")
