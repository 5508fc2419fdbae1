"""The ``netfly`` command: argument parsing and terminal output only (subcommands in this package).

    netfly chat "prompt"           stream an answer to stdout
    netfly models                  list a provider's models
    netfly check                   measure which providers answer now       (check.py)
    netfly serve                   the OpenAI-compatible gateway            (serve.py)
    netfly config check FILE       validate the gateway's configuration file  (config.py)
    netfly local serve             the local model's server, in the foreground  (local.py)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from .. import errors
from ..__about__ import __version__
from ..provider import Provider
from ..providers import provider_names
from . import interactive
from ._providers import resolve_provider
from .check import register_cli as register_check
from .config import register_cli as register_config
from .format import format_stats
from .local import register_cli as register_local
from .logsink import stderr_handler
from .serve import register_cli as register_serve

# Exit codes, one per error class (most specific first); documented in README.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (errors.ConfigurationError, 2),
    (errors.AuthenticationError, 3),
    (errors.RateLimitError, 4),
    (errors.ResponseStatusError, 5),
    (errors.NetflyTimeoutError, 7),
    (errors.TransportError, 6),
    (errors.StreamError, 8),
    (errors.UpstreamError, 9),
    (errors.AllProvidersFailedError, 10),
    (errors.LocalServerError, 11),
    (errors.NetflyError, 1),
)
EXIT_INTERRUPTED = 130


def exit_code_for(error: BaseException) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return code
    return 1


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return "netfly: " + " ".join(record.getMessage().split())


def _setup_logging(verbose: int) -> None:
    # The one-line format uses none of the caller's file, line, thread or process: not looking them
    # up for every record is the logging module's own advice (its "Optimization" section).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = stderr_handler()
    handler.setFormatter(_OneLineFormatter())
    logger = logging.getLogger("netfly")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)


def _add_provider_options(parser: argparse.ArgumentParser) -> None:
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--provider", "-p", metavar="NAME", help=f"provider name ({', '.join(provider_names())})")
    choice.add_argument("--url", metavar="URL", help="base URL of any OpenAI-compatible server")
    parser.add_argument("--api-key", metavar="KEY", default=None,
                        help="API key (default: the provider's env var, e.g. $NETFLY_API_KEY for --url)")


def _resolve_provider(args: argparse.Namespace) -> type[Provider]:
    return resolve_provider(args.provider, args.url, url_label=args.url)


def _read_prompt(prompt: str, stdin: TextIO) -> str:
    text = stdin.read() if prompt == "-" else prompt
    if not text.strip():
        raise errors.ConfigurationError("the prompt is empty")
    return text


async def _chat(args: argparse.Namespace) -> int:
    out = sys.stdout
    provider = _resolve_provider(args)
    messages = interactive.load_conversation(args.conversation) if args.conversation else []
    if args.system:
        interactive.set_system(messages, args.system)
    talk = args.prompt is None and sys.stdin.isatty()  # no prompt on a terminal: a conversation
    if not talk:
        messages.append({"role": "user", "content": _read_prompt(args.prompt or "-", sys.stdin)})
    params: dict[str, Any] = {}
    if args.temperature is not None:
        params["temperature"] = args.temperature
    if args.max_tokens is not None:
        params["max_tokens"] = args.max_tokens
    if args.api_key:
        params["api_key"] = args.api_key
    if args.timeout is not None:
        params["timeout"] = args.timeout
    if args.retries is not None:
        params["max_retries"] = args.retries
    is_running: Callable[[], bool] | None = getattr(provider, "is_running", None)
    if is_running is not None and not is_running():
        sys.stderr.write("netfly: starting local model…\n")
        sys.stderr.flush()
    if talk:
        return await interactive.run(interactive.Session(provider, args.model, messages, args.proxy, params))
    stream = provider.stream(args.model, messages, args.proxy, **params)
    wrote = False
    try:
        async with stream:
            async for text in stream:
                out.write(text)
                out.flush()
                wrote = True
    finally:
        if wrote:
            out.write("\n")
            out.flush()
        if args.stats:
            sys.stderr.write(format_stats(stream.stats) + "\n")
    return 0


async def _models(args: argparse.Namespace) -> int:
    provider = _resolve_provider(args)
    for model in await provider.list_models(api_key=args.api_key):
        sys.stdout.write(model + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netfly", description="Streaming chat completions from OpenAI-compatible APIs."
    )
    parser.add_argument("--version", action="version", version=f"netfly {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    chat = commands.add_parser("chat", help="stream an answer to stdout; no prompt on a terminal: a conversation")
    chat.add_argument("prompt", nargs="?", help="the prompt; - (or none, with piped input) reads it from stdin; "
                      "none on a terminal starts an interactive conversation")
    chat.add_argument("--continue", "-c", dest="conversation", metavar="FILE", default=None,
                      help="continue a conversation saved with /save (a JSON list of messages)")
    _add_provider_options(chat)
    chat.add_argument("--model", "-m", default=None, help="model name (default: the provider's)")
    chat.add_argument("--system", "-s", default=None, help="system message")
    chat.add_argument("--temperature", "-t", type=float, default=None)
    chat.add_argument("--max-tokens", type=int, default=None)
    chat.add_argument("--proxy", default=None, help="http://, https://, socks5:// or socks5h:// proxy URL")
    chat.add_argument("--timeout", type=float, default=None, help="total time limit in seconds")
    chat.add_argument("--retries", type=int, default=None, help="attempts in all (default: the provider's)")
    chat.add_argument("--stats", action="store_true", help="print stream statistics to stderr")
    chat.set_defaults(func=_chat)

    models = commands.add_parser("models", help="list a provider's models")
    _add_provider_options(models)
    models.set_defaults(func=_models)

    # Subcommands whose terminal code lives beside what they drive.
    register_check(commands)
    register_serve(commands)
    register_local(commands)
    register_config(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for commands that start copies of themselves
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    _setup_logging(args.verbose)
    try:
        # Subcommand handlers take the parsed arguments and return an exit code; async ones are run.
        if asyncio.iscoroutinefunction(args.func):
            return int(asyncio.run(args.func(args)) or 0)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("\nnetfly: interrupted\n")
        return EXIT_INTERRUPTED
    except errors.NetflyError as error:
        sys.stdout.flush()
        sys.stderr.write(f"netfly: error: {type(error).__name__}: {' '.join(str(error).split())}\n")
        return exit_code_for(error)
    except BrokenPipeError:
        return 0
