"""netfly: streaming chat completions from OpenAI-compatible HTTP APIs.

    from netfly import FreeNetfly
    async for chunk in FreeNetfly.create_async_generator(model="gpt-3.5-turbo", messages=messages):
        print(chunk, end="")
"""

from __future__ import annotations

import logging

from .__about__ import __version__
from .chunks import ChatResult, ChunkInterpreter
from .errors import (
    AllProvidersFailedError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ModelNotSupportedError,
    NetflyError,
    NetflyTimeoutError,
    ProxyError,
    RateLimitError,
    ResponseStatusError,
    ServerError,
    StreamDecodeError,
    StreamError,
    StreamInterruptedError,
    TransportError,
    UpstreamError,
)
from .provider import Provider
from .providers import FreeNetfly, Ollama, OpenAI, OpenAICompatible, get_provider, provider_names, register
from .retry import RetryPolicy
from .sse import ServerSentEvent, SSEDecoder
from .stream import ChatRequest, ChatStream, StreamStats
from .transport import Proxy, Timeout, aclose

logging.getLogger("netfly").addHandler(logging.NullHandler())

__all__ = [
    "AllProvidersFailedError", "AuthenticationError", "BadRequestError", "ChatRequest", "ChatResult",
    "ChatStream", "ChunkInterpreter", "ConfigurationError", "FreeNetfly", "ModelNotSupportedError",
    "NetflyError", "NetflyTimeoutError", "Ollama", "OpenAI", "OpenAICompatible", "Provider", "Proxy",
    "ProxyError", "RateLimitError", "ResponseStatusError", "RetryPolicy", "SSEDecoder", "ServerError",
    "ServerSentEvent", "StreamDecodeError", "StreamError", "StreamInterruptedError", "StreamStats",
    "Timeout", "TransportError", "UpstreamError", "__version__", "aclose", "get_provider",
    "provider_names", "register",
]
