"""netfly: streaming chat completions from OpenAI-compatible HTTP APIs.

    from netfly import FreeNetfly
    async for chunk in FreeNetfly.create_async_generator(model="gpt-3.5-turbo", messages=messages):
        ...  # each chunk is a piece of the answer's text, as it arrives
    async for event in FreeNetfly.events(model="gpt-4", messages=messages, tools=tools):
        ...  # typed events: ChunkMeta, ChoiceDelta (text, reasoning, tool calls...), Usage
"""

from __future__ import annotations

import asyncio
import logging

from . import transport as _transport
from .__about__ import __version__
from .chunks import ChunkInterpreter
from .errors import (
    AllProvidersFailedError,
    AuthenticationError,
    BadRequestError,
    CircuitOpenError,
    ConfigurationError,
    LocalServerError,
    ModelNotSupportedError,
    NetflyError,
    NetflyTimeoutError,
    ProxyError,
    RateLimitError,
    RedirectError,
    ResponseStatusError,
    ServerError,
    StreamDecodeError,
    StreamError,
    StreamInterruptedError,
    TransportError,
    UpstreamError,
)
from .events import (
    ChatAccumulator,
    ChatResult,
    ChoiceDelta,
    ChoiceResult,
    ChunkMeta,
    Event,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from .health import HealthResult
from .provider import Provider
from .providers import FreeNetfly, Local, Ollama, OpenAI, OpenAICompatible, get_provider, provider_names, register
from .providers.llama_server import stop_all as _stop_local_servers
from .retry import RetryPolicy
from .routing import CircuitBreakers, Fastest, Ordered, RetryProvider, RoutedProvider, Shuffled, Strategy
from .sse import ServerSentEvent, SSEDecoder
from .stream import ChatRequest, ChatStream, PreparedCall, StreamStats
from .transport import Proxy, Timeout

logging.getLogger("netfly").addHandler(logging.NullHandler())


async def aclose() -> None:
    """Close netfly's pooled connections on the running loop and stop local model servers it started."""
    await _transport.aclose()
    await asyncio.get_running_loop().run_in_executor(None, _stop_local_servers)

__all__ = [
    "aclose",
    "AllProvidersFailedError",
    "AuthenticationError",
    "BadRequestError",
    "ChatAccumulator",
    "ChatRequest",
    "ChatResult",
    "ChatStream",
    "ChoiceDelta",
    "ChoiceResult",
    "ChunkInterpreter",
    "ChunkMeta",
    "CircuitBreakers",
    "CircuitOpenError",
    "ConfigurationError",
    "Event",
    "Fastest",
    "LocalServerError",
    "FreeNetfly",
    "get_provider",
    "HealthResult",
    "Local",
    "ModelNotSupportedError",
    "NetflyError",
    "NetflyTimeoutError",
    "Ollama",
    "OpenAI",
    "OpenAICompatible",
    "Ordered",
    "PreparedCall",
    "Provider",
    "provider_names",
    "Proxy",
    "ProxyError",
    "RateLimitError",
    "RedirectError",
    "register",
    "ResponseStatusError",
    "RetryPolicy",
    "RetryProvider",
    "RoutedProvider",
    "ServerError",
    "ServerSentEvent",
    "Shuffled",
    "SSEDecoder",
    "Strategy",
    "StreamDecodeError",
    "StreamError",
    "StreamInterruptedError",
    "StreamStats",
    "Timeout",
    "ToolCall",
    "ToolCallDelta",
    "TransportError",
    "UpstreamError",
    "Usage",
    "__version__",
]
