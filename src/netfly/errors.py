"""The one exception tree of netfly.

Every error netfly raises is a :class:`NetflyError`::

    NetflyError
    ├── ConfigurationError            bad input or setup, raised before any I/O
    │   └── ModelNotSupportedError    model outside the provider's ``models``
    ├── TransportError                could not exchange bytes with the server
    │   ├── ProxyError                the proxy refused or failed
    │   └── NetflyTimeoutError        connect / idle / total limit hit (also a ``TimeoutError``)
    ├── ResponseStatusError           the server answered with a non-2xx status (``.status``)
    │   ├── RedirectError             3xx: never followed (``.location``, password hidden)
    │   ├── BadRequestError           400, 404, 422 and other 4xx not listed below
    │   ├── AuthenticationError       401, 403
    │   ├── RateLimitError            429
    │   └── ServerError               5xx
    ├── StreamError                   the answer's stream went wrong
    │   ├── StreamInterruptedError    cut after output was delivered (``.partial_text``, ``.partial_result``)
    │   └── StreamDecodeError         bytes that are not a valid event stream
    ├── UpstreamError                 the server reported an error inside the answer
    ├── LocalServerError              the local model's llama.cpp child died, failed to start, or is
    │                                 not restarted after repeated crashes (``.returncode``, ``.log_path``)
    ├── CircuitOpenError              a routed provider skipped while it cools down after failures
    └── AllProvidersFailedError       a routed request failed on every provider (``.errors``)

Messages never contain API keys or proxy passwords: they are built by netfly from redacted parts,
and every text an upstream sent (message, code, type, param, body) is scrubbed of the call's secrets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class NetflyError(Exception):
    """Base class of every error raised by netfly."""


class ConfigurationError(NetflyError, ValueError):
    """Invalid arguments or provider configuration; raised before any network I/O.

    ``param`` names the argument or request field at fault (``"messages"``, ``"model"``…) when there
    is one, so a server can report it without parsing the message.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


class ModelNotSupportedError(ConfigurationError):
    """The requested model is not in the provider's ``models``."""

    def __init__(self, provider: str, model: str, supported: Sequence[str]) -> None:
        self.provider = provider
        self.model = model
        self.supported = list(supported)
        super().__init__(
            f"model {model!r} is not supported by {provider}; supported: {', '.join(self.supported)}",
            param="model",
        )


class TransportError(NetflyError):
    """Connecting, sending or receiving failed (refused, reset, DNS, TLS)."""


class ProxyError(TransportError):
    """The proxy could not be reached or refused the tunnel.

    ``retryable`` is ``False`` when the proxy rejected the credentials: asking again cannot help.
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        self.retryable = retryable
        super().__init__(message)


class NetflyTimeoutError(TransportError, TimeoutError):
    """A connect, idle (between chunks) or total time limit was exceeded.

    ``phase`` is ``"connect"``, ``"idle"`` or ``"total"``.
    """

    def __init__(self, message: str, phase: str) -> None:
        self.phase = phase
        super().__init__(message)


class ResponseStatusError(NetflyError):
    """The server answered with an HTTP error status.

    ``status`` is the HTTP status, ``message`` the server's own error message (when it sent one),
    ``retry_after`` the delay it asked for in seconds (when it did).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        provider: str = "",
        retry_after: float | None = None,
        body: Any = None,
    ) -> None:
        self.status = status
        self.message = message
        self.provider = provider
        self.retry_after = retry_after
        self.body = body
        where = f"{provider}: " if provider else ""
        super().__init__(f"{where}HTTP {status}: {message}" if message else f"{where}HTTP {status}")


class RedirectError(ResponseStatusError):
    """3xx: the server sent the request elsewhere. netfly never follows a redirect: following it
    would turn a POST into a body-less GET (301/302/303) or hand the credentials to another host.
    ``location`` is where it pointed (a password in it hidden); point the provider's ``url`` there.
    """

    def __init__(self, status: int, location: str, *, provider: str = "", body: Any = None) -> None:
        self.location = location
        where = f"to {location!r}" if location else "with no Location"
        super().__init__(
            status, f"redirected {where}; netfly does not follow redirects (set the provider's url to the "
            "final address)", provider=provider, body=body,
        )


class BadRequestError(ResponseStatusError):
    """A 4xx status other than 401, 403 and 429: the request itself was refused."""


class AuthenticationError(ResponseStatusError):
    """401 or 403: the API key is missing, wrong or not allowed."""


class RateLimitError(ResponseStatusError):
    """429: too many requests; ``retry_after`` says how long the server asked to wait."""


class ServerError(ResponseStatusError):
    """5xx: the server failed."""


class StreamError(NetflyError):
    """The event stream of an answer could not be read to its end."""


class StreamInterruptedError(StreamError):
    """The stream broke after output was already delivered, so it cannot be retried safely.

    ``partial_text`` holds the text the caller received before the break; ``partial_result`` (a
    :class:`~netfly.ChatResult`) everything: text, reasoning, the tool calls as far as they came.
    """

    def __init__(self, message: str, partial_text: str, partial_result: Any = None) -> None:
        self.partial_text = partial_text
        self.partial_result = partial_result
        super().__init__(message)


class StreamDecodeError(StreamError):
    """The stream's bytes broke the event-stream format (over-long line, bad JSON in strict mode)."""


class UpstreamError(NetflyError):
    """The server reported an error inside a successful (2xx) answer: its ``message``, ``code``,
    ``type`` and ``param`` as sent (secrets of the call scrubbed)."""

    def __init__(self, message: str, *, code: Any = None, type: Any = None, param: Any = None) -> None:
        self.message = message
        self.code = code
        self.type = type
        self.param = param
        super().__init__(message)


class LocalServerError(NetflyError):
    """The local model's server (the llama.cpp child process) failed at run time.

    It was killed by a signal or exited (``returncode``: negative for a signal, as in
    :mod:`subprocess`), did not answer in time at start-up, or crashed so often that it is not
    restarted for now (``retry_after``: seconds until it is tried again). ``reason`` says which,
    ``log_path`` is the server's log and ``log_tail`` its last lines (the child holds no secrets).
    """

    def __init__(
        self,
        reason: str,
        *,
        log_path: str | None = None,
        log_tail: Sequence[str] = (),
        returncode: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.reason = reason
        self.log_path = log_path
        self.log_tail = tuple(log_tail)
        self.returncode = returncode
        self.retry_after = retry_after
        log = f"; log: {log_path}" if log_path else ""
        tail = f"; last lines: {' | '.join(self.log_tail)}" if self.log_tail else ""
        super().__init__(f"{reason}{log}{tail}")


class CircuitOpenError(NetflyError):
    """A router skipped this provider: it failed too often and its cool-down has not ended.

    ``retry_in`` is the number of seconds until it is tried again; ``last_error`` describes the
    failure that opened the circuit.
    """

    def __init__(self, provider: str, retry_in: float, failures: int, last_error: str | None = None) -> None:
        self.provider = provider
        self.retry_in = retry_in
        self.failures = failures
        self.last_error = last_error
        last = f"; last error: {last_error}" if last_error else ""
        wait = f"cooling down for {retry_in:.1f} s more" if retry_in > 0 else "a trial request is testing it"
        super().__init__(f"{provider}: skipped, {wait} after {failures} failure(s){last}")


class AllProvidersFailedError(NetflyError):
    """Every provider of a routed request failed; ``errors`` maps provider name to its error."""

    def __init__(self, errors: dict[str, BaseException]) -> None:
        self.errors = errors
        lines = "; ".join(f"{name}: {type(err).__name__}: {err}" for name, err in errors.items())
        super().__init__(f"all providers failed: {lines}")


def error_for_status(
    status: int, message: str, *, provider: str = "", retry_after: float | None = None, body: Any = None
) -> ResponseStatusError:
    """The most specific :class:`ResponseStatusError` subclass for an HTTP status."""
    cls: type[ResponseStatusError]
    if status in (401, 403):
        cls = AuthenticationError
    elif status == 429:
        cls = RateLimitError
    elif status >= 500:
        cls = ServerError
    elif 400 <= status < 500:
        cls = BadRequestError
    else:
        cls = ResponseStatusError
    return cls(status, message, provider=provider, retry_after=retry_after, body=body)


def error_message_from_body(body: Any, fallback: str) -> str:
    """The human message inside an error response body, in the shapes servers commonly use."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            for key in ("message", "detail", "msg"):
                if error.get(key):
                    return str(error[key])
        elif error:
            return str(error)
        if body.get("detail"):
            return str(body["detail"])
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return fallback
