"""``netfly local serve``: the local model's OpenAI-compatible server in the foreground.

Terminal code only; the server itself is :class:`netfly.providers.local.Local`'s child. stdout gets
one line, the server's base URL (``http://127.0.0.1:8080/v1``), for scripts; everything else goes
to stderr. Ctrl-C or SIGTERM stops the server and exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from ..errors import LocalServerError
from ..providers.llama_server import MODEL_ENV
from ..providers.local import Local

DEFAULT_PORT = 8080  # OpenAICompatible's default URL, so `netfly chat --provider OpenAICompatible` finds it


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    local = subparsers.add_parser(
        "local", help="the local model (needs netfly[local])",
        description="The local model: a llama.cpp server on this machine, no network needed.",
    )
    commands = local.add_subparsers(dest="local_command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve", help="serve the local model over an OpenAI-compatible HTTP API until Ctrl-C",
        description="Serve the local model (OpenAI-compatible /v1/chat/completions) in the foreground. "
        "Prints the base URL on stdout once it answers; Ctrl-C stops it.",
    )
    serve.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"TCP port (default: {DEFAULT_PORT}; 0 picks a free one)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--model", dest="model_path", metavar="GGUF", default=None,
                       help=f"model file (default: ${MODEL_ENV}, else the bundled SmolLM2-135M-Instruct)")
    serve.add_argument("--n-ctx", type=int, default=None, help=f"context size in tokens (default: {Local.n_ctx})")
    serve.add_argument("--log", metavar="FILE", default=None,
                       help="the server's own log (default: a temporary file, named on stderr)")
    serve.set_defaults(func=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    provider = Local.configure(
        name="Local",
        host=args.host,
        port=args.port or None,
        model_path=args.model_path,
        n_ctx=args.n_ctx or Local.n_ctx,
        log_path=args.log,
    )
    server = provider.server()
    err = sys.stderr
    restore = _stop_on_sigterm()
    try:
        err.write(f"netfly: starting local model {server.config.model_alias}…\n")
        err.flush()
        server.start_sync(provider.startup_timeout)
        url = f"{server.base_url}/v1"
        err.write(
            f"netfly: serving {server.config.model_alias} at {url} (POST {url}/chat/completions), "
            f"ready in {server.startup_seconds or 0:.2f} s; log: {server.log_path}; Ctrl-C stops it\n"
        )
        err.flush()
        sys.stdout.write(url + "\n")
        sys.stdout.flush()
        server.wait()
        error = server.crash() or LocalServerError("the local model server exited on its own")
    except KeyboardInterrupt:
        err.write("netfly: local model server stopped\n")
        return 0
    finally:
        server.stop()
        restore()
    raise error


def _stop_on_sigterm() -> Callable[[], None]:
    """Turn SIGTERM into KeyboardInterrupt while serving, so the child is stopped the same way.

    Returns the function that puts the previous handler back.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore
