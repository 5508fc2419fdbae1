"""Provider presets, and the registry the CLI and gateway look names up in."""

from __future__ import annotations

from ..errors import ConfigurationError
from ..provider import Provider
from .freenetfly import FreeNetfly
from .local import Local
from .openai_compatible import Ollama, OpenAI, OpenAICompatible

__all__ = ["FreeNetfly", "Local", "Ollama", "OpenAI", "OpenAICompatible", "get_provider", "provider_names", "register"]

_registry: dict[str, type[Provider]] = {}


def register(provider: type[Provider], name: str | None = None) -> type[Provider]:
    """Make ``provider`` known to the CLI and the gateway under ``name`` (default: its name)."""
    _registry[(name or provider.name()).lower()] = provider
    return provider


def provider_names() -> list[str]:
    return sorted(p.name() for p in _registry.values())


def get_provider(name: str) -> type[Provider]:
    """Look a provider up by name, case-insensitively."""
    provider = _registry.get(name.lower())
    if provider is None:
        raise ConfigurationError(f"unknown provider {name!r}; known providers: {', '.join(provider_names())}")
    return provider


for _provider in (FreeNetfly, OpenAICompatible, OpenAI, Ollama, Local):
    register(_provider)
