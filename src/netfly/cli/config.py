"""``netfly config check FILE`` and the ``--config`` side of ``netfly serve``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ..config import ConfigFileError, NetflyConfig, ServerConfig, StateConfig, load_config
from ..errors import ConfigurationError
from ..gateway.groups import ConfigRouter
from ..gateway.keys import StateStore
from ..gateway.operations import Operations
from ..gateway.redisstore import RedisStore
from ..gateway.server import serve, start
from ..gateway.web import App
from .logsink import stderr_handler

EXIT_INVALID = 2


def register_cli(subparsers: Any) -> None:
    """Add ``config`` (with ``check``) to the ``netfly`` command's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "config", help="work with a gateway configuration file",
        description="Validate a configuration file of 'netfly serve --config' without serving.",
    )
    commands = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = commands.add_parser("check", help="validate FILE: every problem with its key path, exit 2 if any")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
        if config.providers:
            ConfigRouter(config)  # builds every provider and group: what the server would do first
    except ConfigurationError as exc:
        problems = exc.problems if isinstance(exc, ConfigFileError) else [f"{args.file}: {exc}"]
        for problem in problems:
            sys.stderr.write(f"netfly: {problem}\n")
        return EXIT_INVALID
    sys.stdout.write(f"{args.file}: OK: {summary(config)}\n")
    return 0


def summary(config: NetflyConfig) -> str:
    def count(n: int, what: str) -> str:
        return f"{n} {what}{'' if n == 1 else 's'}"

    return ", ".join([count(len(config.providers), "provider"), count(len(config.models), "model"),
                      count(len(config.keys), "key")])


def setup_request_log(log_format: str) -> None:
    """JSON lines go to stderr as they are, without the ``netfly:`` prefix of other messages."""
    if log_format != "json":
        return
    requests = logging.getLogger("netfly.gateway.requests")
    handler = stderr_handler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    requests.addHandler(handler)
    requests.setLevel(logging.INFO)
    requests.propagate = False


def operations_from_args(args: argparse.Namespace) -> tuple[Operations, ServerConfig]:
    """The gateway's operations and server settings: the ``--config`` file's, flags over them."""
    config = load_config(args.config) if args.config else None
    flags = {"host": args.host, "port": args.port, "max_body_bytes": args.max_body_bytes, "timeout": args.timeout,
             "log_format": args.log_format, "log_content": args.log_content}
    server = (config.server if config else ServerConfig()).model_copy(
        update={name: value for name, value in flags.items() if value is not None}
    )
    if config is not None:
        config = config.model_copy(update={"server": server})
    setup_request_log(server.log_format)
    operations = Operations(config, path=args.config, store=state_store(args, config),
                            log_format=server.log_format, log_content=server.log_content)
    return operations, server


def state_store(args: argparse.Namespace, config: NetflyConfig | None) -> StateStore | None:
    """A :class:`RedisStore` when ``--state`` or ``[state] url`` names one; ``None``: this process's memory."""
    state = config.state if config else StateConfig()
    url = getattr(args, "state", None) or state.url
    if url is None:
        return None
    timeout = getattr(args, "state_timeout", None) or state.timeout
    if not 0 < timeout < float("inf"):
        raise ConfigurationError(f"--state-timeout must be a positive number of seconds, got {timeout!r}")
    return RedisStore(url, timeout=timeout, lease_ttl=state.lease_ttl)


async def serve_with_metrics(
    app: App, host: str, port: int, operations: Operations, metrics_port: int | None, **options: Any
) -> None:
    """Serve ``app`` (``options`` go to :func:`~netfly.gateway.serve`), and ``/metrics`` on
    ``metrics_port`` too when it is set."""
    if metrics_port is None:
        await serve(app, host, port, **options)
        return
    metrics = await start(operations.metrics_app(), host, metrics_port, reuse_port=options.get("reuse_port", False))
    try:
        await serve(app, host, port, **options)
    finally:
        await metrics.cleanup()
