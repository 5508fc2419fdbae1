"""``netfly check``: measure which providers answer now and print a table.

Wired into the main parser by :mod:`netfly.cli` with :func:`register_cli`. Exit status: 0 when every
checked provider answered, 1 when one did not, 2 for a usage error (unknown provider name).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from ..errors import ConfigurationError
from ..health import DEFAULT_CHECK_TIMEOUT, HealthResult, check_all
from ..provider import Provider
from ..providers import OpenAICompatible, get_provider, provider_names
from ..redact import redact_url
from ..transport import aclose
from .format import format_health_table


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``check`` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "check",
        help="measure whether providers answer now (a one-token request each)",
        description="Send each provider a one-token request and print its measured state next to its "
        "declared one. Exit status 0 when all answered, 1 otherwise.",
    )
    parser.add_argument(
        "--provider", action="append", default=[], metavar="NAME",
        help="provider to check (repeatable or comma-separated; default: every registered provider)",
    )
    parser.add_argument(
        "--url", action="append", default=[], metavar="URL",
        help="also check the OpenAI-compatible server at URL (repeatable)",
    )
    parser.add_argument("--model", help="model to ask for (default: each provider's own)")
    parser.add_argument("--proxy", help="proxy URL (http, https, socks5, socks5h)")
    parser.add_argument(
        "--timeout", type=_positive_seconds, default=DEFAULT_CHECK_TIMEOUT, metavar="SECONDS",
        help=f"time limit of each check (default: {DEFAULT_CHECK_TIMEOUT:g})",
    )
    parser.set_defaults(func=run_check)
    return parser


def run_check(args: argparse.Namespace) -> int:
    """The ``check`` handler: returns the exit status."""
    try:
        providers = selected_providers(args.provider, args.url)
    except ConfigurationError as exc:
        print(f"netfly check: {exc}", file=sys.stderr)
        return 2
    results = asyncio.run(_check(providers, args))
    print(format_health_table(results))
    return 0 if all(result.ok for result in results) else 1


def selected_providers(names: list[str], urls: list[str]) -> list[type[Provider]]:
    """The providers named (comma-separated names allowed) plus one per URL; all when none given."""
    wanted = [name.strip() for item in names for name in item.split(",") if name.strip()]
    if not wanted and not urls:
        wanted = provider_names()
    providers = [get_provider(name) for name in wanted]
    providers += [OpenAICompatible.configure(url=url, name=redact_url(url)) for url in urls]
    return providers


async def _check(providers: list[type[Provider]], args: argparse.Namespace) -> list[HealthResult]:
    try:
        return await check_all(providers, model=args.model, timeout=args.timeout, proxy=args.proxy)
    finally:
        await aclose()


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value!r}")
    return seconds
