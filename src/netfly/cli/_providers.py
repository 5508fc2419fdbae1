"""Which provider a command uses: ``--url``, ``--provider``, ``$NETFLY_PROVIDER``, else ``Local``."""

from __future__ import annotations

import os

from ..errors import ConfigurationError
from ..provider import Provider
from ..providers import OpenAICompatible, get_provider, provider_names
from ..providers.llama_server import INSTALL_HINT
from ..providers.local import Local, is_available
from ..redact import redact_url

PROVIDER_ENV = "NETFLY_PROVIDER"


def resolve_provider(name: str | None, url: str | None, *, url_label: str | None = None) -> type[Provider]:
    """The provider chosen on the command line; with none chosen, the local model when installed.

    ``url_label`` names the provider made for ``url`` (default: ``OpenAICompatible``).
    """
    if url:
        provider = OpenAICompatible.configure(url=url, name=redact_url(url_label) if url_label else None)
        provider.endpoint_url()  # a malformed URL fails now, not on the first request
        return provider
    name = name or os.environ.get(PROVIDER_ENV)
    if name:
        return get_provider(name)
    if is_available():
        return Local
    raise ConfigurationError(
        "no provider chosen and the local model is not installed; pick one with --provider NAME "
        f"({', '.join(provider_names())}) or --url URL, or install the local model: {INSTALL_HINT}"
    )
