"""The provider base class: configuration as class attributes, the same engine underneath.

A provider turns ``(model, messages, **kwargs)`` into a validated :class:`ChatRequest` and hands it
to a :class:`ChatStream`. Keyword arguments are request-body fields (``temperature``, ``tools``…),
except the call options in :data:`CALL_OPTIONS`; a near miss of a call option (``timout=5``) is
refused with a "did you mean" rather than sent upstream. Subclassing changes the target::

    class Local(FreeNetfly):
        url = "http://127.0.0.1:8080"
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import AsyncIterator, Collection, Iterator, Mapping, Sequence
from contextlib import aclosing
from functools import partial
from types import FunctionType
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

from . import _checks, _json, _sync
from .__about__ import __version__
from .errors import ConfigurationError, ModelNotSupportedError
from .events import ChatResult, Event
from .health import DEFAULT_CHECK_TIMEOUT, HealthResult, check_provider
from .messages import validate_messages
from .redact import header_secrets, redact_url, url_secrets
from .retry import RetryPolicy
from .sse import DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_LINE_BYTES
from .stream import ChatRequest, ChatStream, PreparedCall
from .transport import Proxy, Timeout, fetch_json

P = TypeVar("P", bound="Provider")

# Per-call keyword arguments that configure the call instead of going into the request body.
CALL_OPTIONS = frozenset({
    "timeout", "max_attempts", "max_retries", "retry_delay", "retry_policy", "headers", "api_key", "strict",
    "max_line_bytes", "max_event_bytes", "extra_body",
})
# Request-body fields of OpenAI's and common servers' chat APIs: never mistaken for a typo of a call
# option, however close their names.
BODY_FIELDS = frozenset({
    "messages", "model", "stream", "stream_options", "temperature", "top_p", "top_k", "min_p", "n", "stop",
    "max_tokens", "max_completion_tokens", "presence_penalty", "frequency_penalty", "repeat_penalty",
    "logit_bias", "logprobs", "top_logprobs", "user", "seed", "tools", "tool_choice", "parallel_tool_calls",
    "response_format", "functions", "function_call", "reasoning_effort", "modalities", "audio", "prediction",
    "metadata", "store", "service_tier", "web_search_options", "verbosity", "grammar", "json_schema",
})

_NO_NAMES: frozenset[str] = frozenset()

BROWSER_USER_AGENT = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36"
)


class ValidatedMessages(list[dict[str, Any]]):
    """Messages :func:`~netfly.messages.validate_messages` returned: a router checks them once for
    every provider it prepares a call for."""


class Provider:
    """Base of every provider. Subclasses set class attributes; the methods stay the same."""

    label: ClassVar[str | None] = None  # display name; defaults to the class name
    url: ClassVar[str] = ""
    api_endpoint: ClassVar[str] = "/v1/chat/completions"
    working: ClassVar[bool] = False  # declared state; ``await P.check()`` measures it
    default_model: ClassVar[str] = ""
    models: ClassVar[Sequence[str]] = ()  # empty: any model name is passed through
    model_aliases: ClassVar[Mapping[str, str]] = {}
    default_params: ClassVar[Mapping[str, Any]] = {}  # request-body defaults, overridable per call
    headers: ClassVar[Mapping[str, str]] = {}  # extra headers, over the defaults
    # Headers holding credentials besides Authorization, x-api-key, api-key, Proxy-Authorization and
    # Cookie: their values are scrubbed from errors and logs like the API key.
    secret_headers: ClassVar[Collection[str]] = ()
    browser_headers: ClassVar[bool] = False  # send browser-like headers (origin, referer, UA)
    api_key: ClassVar[str | None] = None
    api_key_env: ClassVar[str | None] = None  # env var read when api_key is not set
    needs_auth: ClassVar[bool] = False
    max_retries: ClassVar[int] = 5  # attempts in all, the first included (the seed's name; = max_attempts)
    retry_delay: ClassVar[float] = 2.0  # first backoff delay, doubled each retry
    timeout: ClassVar[Timeout] = Timeout()

    # -- configuration -------------------------------------------------------------------------

    @classmethod
    def name(cls) -> str:
        return cls.label or cls.__name__

    @classmethod
    def configure(cls: type[P], *, name: str | None = None, **attributes: Any) -> type[P]:
        """A subclass with some class attributes changed, without writing a class.

        ``OpenAICompatible.configure(url="http://127.0.0.1:8080", api_key="...")``. Only settings can
        be changed: an unknown name, a private one or a method is refused.
        """
        unknown = sorted(k for k in attributes if not hasattr(cls, k) or k.startswith("_"))
        if unknown:
            raise ConfigurationError(f"{cls.name()}.configure: unknown attribute(s): {', '.join(unknown)}")
        methods = sorted(k for k in attributes if _is_method(cls, k))
        if methods:
            raise ConfigurationError(f"{cls.name()}.configure: {', '.join(methods)}: a method, not a setting")
        if "timeout" in attributes:
            attributes["timeout"] = Timeout.coerce(attributes["timeout"])
        if name is not None:
            if not isinstance(name, str) or not name:
                raise ConfigurationError(f"{cls.name()}.configure: name must be a non-empty string, got {name!r}")
            attributes["label"] = name
        return type(name or cls.__name__, (cls,), attributes)

    @classmethod
    def get_model(cls, model: str | None) -> str:
        """Resolve ``model``: empty → ``default_model``; aliases honoured; checked against ``models``."""
        if model is not None and not isinstance(model, str):
            raise ConfigurationError(f"model must be a string, got {type(model).__name__}", param="model")
        if not model:
            if not cls.default_model:
                raise ConfigurationError(f"{cls.name()} has no default model; pass model=...", param="model")
            return cls.default_model
        model = cls.model_aliases.get(model, model)
        if cls.models and model not in cls.models:
            raise ModelNotSupportedError(cls.name(), model, cls.models)
        return model

    @classmethod
    def endpoint_url(cls) -> str:
        return _checked_endpoint(cls.name(), cls.url, cls.api_endpoint)

    @classmethod
    def resolve_api_key(cls, api_key: str | None = None) -> str | None:
        if api_key:
            return api_key
        if cls.api_key:
            return cls.api_key
        if cls.api_key_env:
            return os.environ.get(cls.api_key_env) or None
        return None

    @classmethod
    def check_credentials(cls) -> None:
        """:class:`ConfigurationError` when the url's ``user:password`` and an ``Authorization`` header
        (the API key, or one in ``headers``) would both be sent; no I/O. A gateway checks its providers
        so at start-up: an operator's mistake, not a client's on every request."""
        if "@" in cls.url:
            headers = {**cls.headers, "authorization": ""} if cls.resolve_api_key() else cls.headers
            _check_one_authorization(cls.name(), cls.url, headers)

    @classmethod
    def default_headers(cls) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "text/event-stream, application/json"}
        if cls.browser_headers:
            parts = urlsplit(cls.url.rstrip("/"))
            origin = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # never a URL's password
            headers.update({
                "accept-language": "en-US,en;q=0.9",
                "origin": origin,
                "referer": origin + "/",
                "user-agent": BROWSER_USER_AGENT,
            })
        else:
            headers["user-agent"] = f"netfly/{__version__}"
        return headers

    @classmethod
    async def list_models(cls, api_key: str | None = None) -> list[str]:
        """The declared ``models``; when none are declared, the server's ``GET .../models`` list."""
        if cls.models:
            return list(cls.models)
        url = cls.endpoint_url().replace("/chat/completions", "/models")
        key = cls.resolve_api_key(api_key)
        headers = {"authorization": f"Bearer {key}"} if key else {}
        _check_one_authorization(cls.name(), url, headers)
        secrets = _secrets(url, headers, cls.secret_headers, key, None)
        body = await fetch_json(url, headers=headers, timeout=cls.timeout, target=cls.name(), secrets=secrets)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            return [cls.default_model] if cls.default_model else []
        return [str(item.get("id")) for item in data if isinstance(item, dict) and item.get("id")]

    # -- building a request --------------------------------------------------------------------

    @classmethod
    def build_request(
        cls, model: str | None, messages: Any, proxy: str | None = None, **kwargs: Any
    ) -> ChatRequest:
        """Validate everything and build the request; no I/O happens here.

        The body is ``messages``, ``stream: true`` and ``model``, then ``default_params``, then the
        keyword arguments that are not call options (``None`` means "not set"), then ``extra_body``
        as given (``None`` there is sent as ``null``, as openai-python does).
        """
        options = _call_options(kwargs)
        checked = messages if type(messages) is ValidatedMessages else validate_messages(messages)
        resolved_model = cls.get_model(model)
        url = cls.endpoint_url()

        body: dict[str, Any] = {"messages": checked, "stream": True, "model": resolved_model}
        body.update(cls.default_params)
        body.update({k: v for k, v in kwargs.items() if v is not None})
        body.update(options.get("extra_body") or {})
        payload = _serialise(body)

        api_key = cls.resolve_api_key(options.get("api_key"))
        headers = cls._request_headers(options.get("headers"), api_key)
        parsed_proxy = _parse_proxy(proxy)
        return ChatRequest(
            provider=cls.name(),
            url=url,
            headers=headers,
            body=body,
            proxy=parsed_proxy,
            timeout=Timeout.coerce(options["timeout"]) if options.get("timeout") is not None else cls.timeout,
            retry=_retry_policy(cls, options),
            strict=options.get("strict", False),
            max_line_bytes=options.get("max_line_bytes", DEFAULT_MAX_LINE_BYTES),
            max_event_bytes=options.get("max_event_bytes", DEFAULT_MAX_EVENT_BYTES),
            secrets=_secrets(url, headers, cls.secret_headers, api_key, parsed_proxy),
            payload=payload,
            secret_headers=frozenset(n.lower() for n in cls.secret_headers) if cls.secret_headers else _NO_NAMES,
        )

    @classmethod
    def _request_headers(cls, call_headers: Mapping[str, Any] | None, api_key: str | None) -> dict[str, str]:
        """Defaults, then the class's ``headers``, then the call's, then the key's ``authorization``."""
        headers = cls.default_headers()
        _override_headers(headers, cls.headers)
        if call_headers is not None:
            _override_headers(headers, {str(k): str(v) for k, v in call_headers.items()})
        if api_key:
            _override_headers(headers, {"authorization": f"Bearer {api_key}"})
        elif cls.needs_auth:
            where = f" or set ${cls.api_key_env}" if cls.api_key_env else ""
            raise ConfigurationError(f"{cls.name()} needs an API key: pass api_key=...{where}", param="api_key")
        if "@" in cls.url:
            _check_one_authorization(cls.name(), cls.url, headers)
        return headers

    # -- calling -------------------------------------------------------------------------------

    @classmethod
    def prepare(cls, model: str | None, messages: Any, proxy: str | None = None, **kwargs: Any) -> PreparedCall:
        """Validate the call now (no I/O) and return it ready to start: ``prepare(...).open()``."""
        request = cls.build_request(model, messages, proxy, **kwargs)
        return PreparedCall(request, partial(cls.stream_for, request))

    @classmethod
    def stream_for(cls, request: ChatRequest) -> ChatStream:
        """The stream that sends ``request`` (a provider with its own stream type overrides this)."""
        return ChatStream(request)

    @classmethod
    def stream(cls, model: str | None, messages: Any, proxy: str | None = None, **kwargs: Any) -> ChatStream:
        """Start a streamed answer: an async iterator of text, with ``.events()``, ``.stats`` and,
        once finished, ``.result``."""
        return cls.prepare(model, messages, proxy, **kwargs).open()

    @classmethod
    async def create_async_generator(
        cls, model: str | None, messages: Any, proxy: str | None = None, **kwargs: Any
    ) -> AsyncIterator[str]:
        """Yield the answer's text chunks as they arrive (the seed's interface)."""
        stream = cls.stream(model, messages, proxy, **kwargs)
        try:
            async for text in stream:
                yield text
        finally:
            await stream.aclose()

    @classmethod
    async def events(
        cls, model: str | None, messages: Any, proxy: str | None = None, **kwargs: Any
    ) -> AsyncIterator[Event]:
        """Yield the answer's typed events as they arrive (see :meth:`ChatStream.events`)."""
        stream = cls.stream(model, messages, proxy, **kwargs)
        async with aclosing(stream.events()) as events:
            async for event in events:
                yield event

    @classmethod
    async def complete(cls, model: str | None, messages: Any, proxy: str | None = None, **kwargs: Any) -> ChatResult:
        """The whole answer as a :class:`ChatResult`: text, ``finish_reason``, ``usage``, ``tool_calls``…"""
        async with cls.stream(model, messages, proxy, **kwargs) as stream:
            async for _ in stream:
                pass
        assert stream.result is not None
        return stream.result

    @classmethod
    def complete_sync(cls, model: str | None, messages: Any, proxy: str | None = None, **kwargs: Any) -> ChatResult:
        """:meth:`complete` for synchronous code."""
        return _sync.run(cls.complete(model, messages, proxy, **kwargs))

    @classmethod
    def create(cls, model: str | None, messages: Any, proxy: str | None = None, **kwargs: Any) -> ChatResult:
        """The earlier name of :meth:`complete_sync` (a :class:`ChatResult`; ``str()`` of it is the text)."""
        return cls.complete_sync(model, messages, proxy, **kwargs)

    @classmethod
    async def create_async(cls, model: str | None, messages: Any, proxy: str | None = None, **kwargs: Any) -> str:
        """The whole answer's text only (gpt4free's name): ``(await complete(...)).text``."""
        return (await cls.complete(model, messages, proxy, **kwargs)).text

    @classmethod
    def create_completion(
        cls, model: str | None, messages: Any, stream: bool = True, proxy: str | None = None, **kwargs: Any
    ) -> Iterator[str]:
        """Synchronous generator of the answer's text chunks (gpt4free's signature)."""
        kwargs["stream"] = stream
        cls.build_request(model, messages, proxy, **dict(kwargs))  # fail fast, in the caller's frame
        return _sync.iterate(lambda: cls.create_async_generator(model, messages, proxy, **kwargs))

    @classmethod
    async def check(
        cls, model: str | None = None, *, timeout: float = DEFAULT_CHECK_TIMEOUT, proxy: str | None = None,
        **kwargs: Any,
    ) -> HealthResult:
        """Measure whether the provider answers now: a one-token request, one attempt, a short limit.

        ``working`` stays the declared state; this is the measured one. Never raises for a failed
        check: the result has ``ok=False`` and the error.
        """
        return await check_provider(cls, model, timeout=timeout, proxy=proxy, **kwargs)


@functools.lru_cache(maxsize=256)
def _checked_endpoint(name: str, url: str, api_endpoint: str) -> str:
    # Cached: a provider's URL is parsed and checked once, not on every call (a bad one raises, uncached).
    endpoint = url.rstrip("/") + "/" + api_endpoint.lstrip("/")
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"{name}: url must be an http(s) URL with a host, got {redact_url(url)!r}")
    return endpoint


def _check_one_authorization(name: str, url: str, headers: Mapping[str, str]) -> None:
    """A URL's ``user:password`` is sent as Basic credentials in the ``Authorization`` header, which
    the API key (or a header of the call) would fill too: the HTTP client refuses both, so the caller
    hears it first, naming both."""
    parts = urlsplit(url)
    if (parts.username or parts.password) and any(header.lower() == "authorization" for header in headers):
        raise ConfigurationError(
            f"{name}: the credentials in its url (user:***@) and an Authorization header (the API key, "
            "or one in headers=) cannot both be sent; keep one of them", param="url")


def _secrets(
    url: str, headers: Mapping[str, str], secret_names: Collection[str], api_key: str | None, proxy: Proxy | None
) -> tuple[str, ...]:
    """Everything of one call that must never be shown: the key, credential headers' values, the
    passwords of the URL and of the proxy."""
    found = (api_key, *header_secrets(headers, secret_names), *url_secrets(url), proxy.password if proxy else None)
    return tuple(dict.fromkeys(filter(None, found)))


def _parse_proxy(proxy: Any) -> Proxy | None:
    if not proxy:
        return None
    if not isinstance(proxy, str):
        raise ConfigurationError(f"proxy must be a URL string, got {type(proxy).__name__}", param="proxy")
    return Proxy.parse(proxy)


def _override_headers(headers: dict[str, str], overrides: Mapping[str, str]) -> None:
    """Set ``overrides`` in ``headers``; names are case-insensitive, so one replaces, never duplicates."""
    for name, value in overrides.items():
        for existing in [k for k in headers if k.lower() == name.lower()]:
            del headers[existing]
        headers[name] = value


def _call_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the call options out of ``kwargs`` (the rest is the body) and check them.

    A name close to a call option that is no known body field is a typo: sending it upstream would
    silently ignore what the caller meant.
    """
    for key in kwargs:
        if key in CALL_OPTIONS or key in BODY_FIELDS:
            continue
        close = difflib.get_close_matches(key, CALL_OPTIONS, n=1, cutoff=0.75)
        if close:
            raise ConfigurationError(
                f"unknown option {key!r}: did you mean {close[0]!r}? (a request-body field of that name "
                f"goes in extra_body={{{key!r}: ...}})",
                param=key,
            )
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in CALL_OPTIONS}
    if "max_attempts" in options and "max_retries" in options:
        raise ConfigurationError("pass max_attempts or its older name max_retries, not both", param="max_attempts")
    for name, kind in (("extra_body", Mapping), ("headers", Mapping), ("strict", bool)):
        value = options.get(name)
        if value is not None and not isinstance(value, kind):
            raise ConfigurationError(f"{name} must be a {kind.__name__}, got {type(value).__name__}", param=name)
    for limit in ("max_line_bytes", "max_event_bytes"):
        if limit in options:
            _checks.whole(limit, options[limit], unit="bytes")
    return options


def _retry_policy(cls: type[Provider], options: Mapping[str, Any]) -> RetryPolicy:
    policy = options.get("retry_policy")
    if policy is not None:
        if not isinstance(policy, RetryPolicy):
            raise ConfigurationError("retry_policy must be a netfly.RetryPolicy", param="retry_policy")
        return policy
    name = "max_attempts" if "max_attempts" in options else "max_retries"
    attempts, delay = options.get(name, cls.max_retries), options.get("retry_delay", cls.retry_delay)
    if isinstance(attempts, int) and isinstance(delay, (int, float)):  # hashable: the checked policy is shared
        return _checked_policy(name, attempts, delay)
    return _checked_policy.__wrapped__(name, attempts, delay)  # raises


@functools.lru_cache(maxsize=64, typed=True)  # typed: True is no number of attempts, though True == 1
def _checked_policy(name: str, attempts: Any, delay: Any) -> RetryPolicy:
    # A RetryPolicy is frozen: calls with the same settings share one, checked once (a bad one raises, uncached).
    return RetryPolicy(
        max_attempts=_checks.whole(name, attempts, unit="attempts"),
        initial_delay=_checks.seconds("retry_delay", delay),
    )


def _is_method(cls: type, name: str) -> bool:
    """Whether ``name`` was declared as a method (by the class that first defined it)."""
    declared = next((vars(c)[name] for c in reversed(cls.__mro__) if name in vars(c)), None)
    return isinstance(declared, (classmethod, staticmethod, property, FunctionType))


_UNENCODABLE = (TypeError, ValueError, RecursionError)  # a type JSON lacks; nesting deeper than the encoder goes


def _serialise(body: dict[str, Any]) -> bytes:
    try:
        return _json.dumps(body)
    except _UNENCODABLE:
        pass
    for key, value in body.items():  # find the field to name in the error
        try:
            _json.dumps(value)
        except _UNENCODABLE as exc:
            raise ConfigurationError(f"request field {key!r} is not JSON-serialisable: {exc}", param=key) from None
    raise ConfigurationError("request body is not JSON-serialisable")
