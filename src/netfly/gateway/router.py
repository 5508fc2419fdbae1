"""Which provider and model a request's ``model`` field means.

``"provider/model"`` picks a provider by name (case-insensitive); anything else is a model of the
default provider. A model whose own name starts with a provider name and a slash (say
``openai/gpt-oss-20b`` on a vLLM server) is reached through the default provider's prefix:
``OpenAICompatible/openai/gpt-oss-20b``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConfigurationError, ModelNotSupportedError
from ..provider import Provider
from ..providers import get_provider, provider_names
from .errors import GatewayError


@dataclass(frozen=True)
class Route:
    provider: type[Provider]
    model: str  # the name sent upstream
    public_id: str  # the name the client sees in responses and in /v1/models


class ModelRouter:
    def __init__(self, default: type[Provider], providers: Mapping[str, type[Provider]] | None = None) -> None:
        self.default = default
        if providers is None:
            providers = {name: get_provider(name) for name in provider_names()}
        self.providers: dict[str, type[Provider]] = {name.lower(): p for name, p in providers.items()}
        self.providers[default.name().lower()] = default  # the configured one wins over a registry namesake

    def resolve(self, model: str | None, *, param: str = "model") -> Route:
        """The route for ``model``; :class:`GatewayError` (400, naming ``param``) when there is none."""
        prefix, slash, rest = (model or "").partition("/")
        provider = self.providers.get(prefix.lower()) if slash else None
        try:
            if provider is not None:
                resolved = provider.get_model(rest or None)
                return Route(provider, resolved, f"{provider.name()}/{resolved}")
            resolved = self.default.get_model(model or None)
            return Route(self.default, resolved, resolved)
        except ModelNotSupportedError as exc:
            message = str(exc)
            if slash and provider is None:
                message += f"; nor is {prefix!r} a provider (known: {', '.join(self.names())})"
            raise GatewayError(400, message, param=param, code="model_not_found") from None
        except ConfigurationError as exc:
            raise GatewayError(400, str(exc), param=param) from None

    def names(self) -> list[str]:
        return sorted(p.name() for p in self.providers.values())

    def model_ids(self) -> list[tuple[str, str]]:
        """``(id, owner)`` of every model: the default provider's bare, then every provider's prefixed."""
        ids = [(model, self.default.name()) for model in _models_of(self.default)]
        for provider in sorted(self.providers.values(), key=lambda p: p.name().lower()):
            ids.extend((f"{provider.name()}/{model}", provider.name()) for model in _models_of(provider))
        return ids


def _models_of(provider: type[Provider]) -> list[str]:
    # An empty ``models`` means "any name is passed through": the default model stands for it
    # (get_model, not default_model: Local knows its model's name only from its configuration).
    if provider.models:
        return list(provider.models)
    try:
        return [provider.get_model(None)]
    except ConfigurationError:  # no default model, or a provider that cannot run here
        return []
