"""``netfly serve``: the gateway's subcommand, registered into the ``netfly`` command by ``register_cli``."""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import os
from typing import Any

from ..errors import ConfigurationError
from ..gateway.app import DEFAULT_MAX_BODY_BYTES, create_app
from ..gateway.connections import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    ConnectionLimits,
)
from ..gateway.operations import Operations
from ..gateway.redisstore import DEFAULT_STATE_TIMEOUT
from ..gateway.relay import DEFAULT_KEEPALIVE
from ..gateway.server import DEFAULT_SHUTDOWN_GRACE
from ..gateway.web import App
from ..provider import Provider
from ..providers import provider_names
from ._providers import PROVIDER_ENV, resolve_provider
from .config import operations_from_args, serve_with_metrics
from .loops import LOOPS, chosen_loop, run
from .workers import WORKER_FLAG, Supervisor, watch_supervisor, worker_argv

TOKEN_ENV = "NETFLY_AUTH_TOKEN"

logger = logging.getLogger("netfly.gateway")


def register_cli(subparsers: Any) -> None:
    """Add ``serve`` to the ``netfly`` command's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="run an OpenAI-compatible HTTP API over the providers",
        description="Serve the chat completions, Responses, Messages and embeddings APIs, GET /v1/models and "
                    "GET /health. Only the chosen providers are reachable; the model field picks one: "
                    "'provider/model', or a bare model for the default (the first chosen).",
    )
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="TOML file of providers, models, keys and server settings (flags override it)")
    parser.add_argument("--host", default=None, help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port to bind (default: 8000)")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--provider", "-p", metavar="NAME", action="append",
                        help=f"a provider to expose ({', '.join(provider_names())}); repeat for more, the first "
                        f"is the default (default: ${PROVIDER_ENV}, else Local when installed)")
    choice.add_argument("--url", metavar="URL",
                        help="default provider: any OpenAI-compatible server at URL (API key from $NETFLY_API_KEY)")
    parser.add_argument("--auth-token", metavar="TOKEN", default=None,
                        help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV}; prefer the variable)")
    parser.add_argument("--retries", type=int, default=None, metavar="N",
                        help="upstream attempts in all (default: each provider's own)")
    parser.add_argument("--retry-delay", type=float, default=None, metavar="SECONDS",
                        help="first delay between upstream attempts (default: each provider's own)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="total time limit of one upstream call, retries included")
    parser.add_argument("--proxy", default=None, help="proxy for upstream calls (http://, socks5://, ...)")
    parser.add_argument("--max-body-bytes", type=int, default=None, metavar="N",
                        help=f"largest request body accepted (default: {DEFAULT_MAX_BODY_BYTES})")
    parser.add_argument("--log-format", choices=("text", "json"), default=None,
                        help="request log: a text line, or one JSON object per request (default: text)")
    parser.add_argument("--log-content", action="store_true", default=None,
                        help="put prompts and answers in the JSON request log (off: they are private)")
    parser.add_argument("--cors-origins", metavar="ORIGINS", default=None,
                        help="comma-separated browser origins allowed (default: * = any; '' = no CORS)")
    parser.add_argument("--keepalive", type=float, default=DEFAULT_KEEPALIVE, metavar="SECONDS",
                        help=f"comment line on a silent stream every SECONDS (default: {DEFAULT_KEEPALIVE:g}; "
                        "0: never)")
    parser.add_argument("--loop", choices=LOOPS, default="auto",
                        help="event loop: uvloop when installed (auto, the default), or asyncio's own")
    _add_connection_options(parser)
    _add_scale_options(parser)
    parser.set_defaults(func=run_serve)


def _add_scale_options(parser: argparse.ArgumentParser) -> None:
    scale = parser.add_argument_group("several processes and hosts")
    scale.add_argument("--state", metavar="URL", default=None,
                       help="share limits, stream slots, usage and circuit breakers in Redis or Valkey at URL "
                       "(redis://host:port/db; needs netfly[redis]; default: [state] url, else this process's memory)")
    scale.add_argument("--workers", type=int, default=1, metavar="N",
                       help="N gateway processes on one port (SO_REUSEPORT), a dead one replaced; with more than "
                       "one, keys with limits need --state (default: 1)")
    scale.add_argument(WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    scale.add_argument("--state-timeout", type=float, default=None, metavar="SECONDS",
                       help="time limit of one state call before this process's memory serves instead "
                       f"(default: [state] timeout, else {DEFAULT_STATE_TIMEOUT:g})")


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    limits = parser.add_argument_group("client limits (nginx-like defaults)")
    limits.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT, metavar="SECONDS",
                        help=f"time for a request's line and headers to arrive (default: {DEFAULT_HEADER_TIMEOUT:g})")
    limits.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT, metavar="SECONDS",
                        help=f"time for a whole request body to arrive (default: {DEFAULT_BODY_TIMEOUT:g})")
    limits.add_argument("--keepalive-timeout", type=float, default=DEFAULT_KEEPALIVE_TIMEOUT, metavar="SECONDS",
                        help=f"idle time before a kept-alive connection is closed "
                        f"(default: {DEFAULT_KEEPALIVE_TIMEOUT:g})")
    limits.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                        help=f"open connections accepted; more get a 503 (default: {DEFAULT_MAX_CONNECTIONS})")
    limits.add_argument("--shutdown-grace", type=float, default=DEFAULT_SHUTDOWN_GRACE, metavar="SECONDS",
                        help="on SIGTERM, time for requests in flight to finish before they are cut "
                        f"(default: {DEFAULT_SHUTDOWN_GRACE:g})")


def _app(args: argparse.Namespace, chosen: list[type[Provider] | None], operations: Operations,
         token: str | None) -> App:
    """The gateway app of the command line's settings."""
    return create_app(
        chosen[0],
        providers={provider.name(): provider for provider in chosen if provider is not None},
        operations=operations,
        cors_origins=None if args.cors_origins is None else
        [origin.strip() for origin in args.cors_origins.split(",") if origin.strip()],
        keepalive=args.keepalive,
        auth_token=token,
        max_body_bytes=args.max_body_bytes,
        max_retries=args.retries,
        retry_delay=args.retry_delay,
        timeout=args.timeout,
        proxy=args.proxy,
    )


def run_serve(args: argparse.Namespace) -> int:
    """Handler of ``netfly serve``; returns the exit code (0 after Ctrl-C or SIGTERM)."""
    # The --url provider keeps the name OpenAICompatible, so "OpenAICompatible/model" reaches it.
    operations, settings = operations_from_args(args)
    chosen = _chosen_providers(args, operations)
    token = args.auth_token or (None if operations.keys else os.environ.get(TOKEN_ENV)) or None
    args.host, args.port = settings.host, settings.port
    if not 0 <= args.shutdown_grace < float("inf"):
        raise ConfigurationError(f"--shutdown-grace must be a number of seconds >= 0, got {args.shutdown_grace!r}")
    if args.workers != 1:
        _check_workers(args, operations)
        return Supervisor(worker_argv(args.argv), args.workers, args.shutdown_grace).run()
    app = _app(args, chosen, operations, token)
    limits = ConnectionLimits(
        header_timeout=args.header_timeout, body_timeout=args.body_timeout,
        keepalive_timeout=args.keepalive_timeout, max_connections=args.max_connections,
    )
    gateway_logger = logging.getLogger("netfly.gateway")
    if gateway_logger.getEffectiveLevel() > logging.INFO:
        gateway_logger.setLevel(logging.INFO)  # the per-request lines are the point of a server's log
    if token is None and not operations.keys and not _is_loopback(args.host):
        logger.warning("serving on %s without --auth-token: anyone who can reach it can use the providers",
                       args.host)
    if args.worker:
        watch_supervisor()
    loop = chosen_loop(args.loop)
    logger.info("event loop: %s", loop)
    _settle_the_heap()
    try:
        run(serve_with_metrics(app, args.host, args.port, operations, settings.metrics_port,
                               shutdown_timeout=args.shutdown_grace, limits=limits, reuse_port=args.worker), loop)
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # cannot bind: port in use, address not available, permission
        raise ConfigurationError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return 0


def _settle_the_heap() -> None:
    """Leave what start-up built (modules, config, the app: most of the heap) out of every later
    garbage collection: a full collection then walks only the objects of requests in flight, and
    stalls every stream for a few milliseconds instead of tens (measured at 200 streams). Young
    collections come every 10,000 allocations instead of 700: nearly all of a request's objects are
    freed by their counts anyway (callgrind: 3.9 % fewer instructions per keyed request)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _check_workers(args: argparse.Namespace, operations: Operations) -> None:
    """Several workers: refuse what would silently be wrong, warn about what is per process."""
    if args.workers < 1:
        raise ConfigurationError(f"--workers must be a whole number >= 1, got {args.workers}")
    if args.port == 0:
        raise ConfigurationError("--workers needs a fixed --port: with port 0 each worker would get its own")
    if operations.store.status()["backend"] != "memory":
        return
    limited = sorted(k.name for k in operations.keys.keys.values() if k.rpm or k.tpm or k.max_streams)
    if limited:
        raise ConfigurationError(
            f"--workers {args.workers} without --state: the limits of key(s) {', '.join(limited)} would count per "
            f"worker ({args.workers} times what they say); share them with --state redis://HOST:PORT/DB")
    logger.warning("--workers %d without --state: circuit breakers and usage are per worker", args.workers)


def _chosen_providers(args: argparse.Namespace, operations: Operations) -> list[type[Provider] | None]:
    """The flags' providers (they replace the file's), or ``[None]``: the file's."""
    if args.provider or args.url or not (operations.config and operations.config.providers):
        return [resolve_provider(name, args.url) for name in args.provider or [None]]
    return [None]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
