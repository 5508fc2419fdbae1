"""Providers and model groups built from a configuration file, and the router that exposes them.

Each ``[models.PUBLIC]`` becomes a :class:`~netfly.routing.RoutedProvider` over its targets (each
target: a configured provider asked for one upstream model), so breakers, fallback, fastest-first
and hedging are the router's own; ``weighted`` and ``least-busy`` only change the order it tries
the targets in.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import ModelGroupConfig, NetflyConfig, ProviderConfig
from ..errors import ConfigurationError
from ..provider import Provider
from ..providers import OpenAICompatible, get_provider
from ..routing import CircuitBreakers, Fastest, Ordered, RetryProvider, RoutedProvider, Strategy
from ..stream import ChatRequest, ChatStream
from ..transport import Timeout
from .errors import GatewayError
from .router import ModelRouter, Route

__all__ = ["ConfigRouter", "build_groups", "build_providers"]


class _ConfiguredProvider(Provider):
    """Adds what a provider of the file may set beyond class attributes: its own proxy."""

    proxy_url: ClassVar[str | None] = None

    @classmethod
    def build_request(cls, model: str | None, messages: Any, proxy: str | None = None, **kwargs: Any) -> ChatRequest:
        return super().build_request(model, messages, proxy or cls.proxy_url, **kwargs)


class _Target(Provider):
    """A group's target: in a ``least-busy`` group, knows its streams in flight (other groups never ask)."""

    open_streams: ClassVar[weakref.WeakSet[ChatStream] | None] = None

    @classmethod
    def stream_for(cls, request: ChatRequest) -> ChatStream:
        stream = super().stream_for(request)
        if cls.open_streams is not None:
            cls.open_streams.add(stream)
        return stream

    @classmethod
    def busy(cls) -> int:
        """Streams started and not ended (a stream's ``stats.duration`` is set when it ends)."""
        streams = list(cls.open_streams) if cls.open_streams is not None else []
        return sum(1 for stream in streams if stream.stats.duration is None)


@dataclass(frozen=True)
class Weighted:
    """A random order drawn by weight, per call: a provider of weight 3 comes first three times as
    often as one of weight 1 (a :class:`~netfly.routing.Strategy`)."""

    weights: Mapping[type[Provider], float]

    def __call__(self, providers: Sequence[type[Provider]], breakers: CircuitBreakers) -> list[type[Provider]]:
        remaining, ordered = list(providers), []
        while remaining:
            pick = random.choices(remaining, weights=[self.weights.get(p, 1.0) for p in remaining])[0]
            remaining.remove(pick)
            ordered.append(pick)
        return ordered


@dataclass(frozen=True)
class LeastBusy:
    """The provider with the fewest streams in flight first; ties keep the configured order."""

    def __call__(self, providers: Sequence[type[Provider]], breakers: CircuitBreakers) -> list[type[Provider]]:
        return sorted(providers, key=lambda p: p.busy() if issubclass(p, _Target) else 0)


def build_providers(config: NetflyConfig) -> dict[str, type[Provider]]:
    """One provider class per ``[providers.NAME]``, named NAME."""
    return {name: _provider(name, spec) for name, spec in config.providers.items()}


def _provider(name: str, spec: ProviderConfig) -> type[Provider]:
    base = OpenAICompatible if spec.kind == "openai-compatible" else get_provider(spec.kind)
    attributes: dict[str, Any] = {"label": name, "proxy_url": spec.proxy}
    if spec.url is not None:
        attributes["url"] = spec.url
    if spec.kind == "openai-compatible" or spec.api_key_env is not None:
        attributes["api_key_env"] = spec.api_key_env  # never $NETFLY_API_KEY by default: it is not this server's
    if spec.api_key is not None:
        attributes["api_key"] = spec.api_key
    if spec.headers:
        attributes["headers"] = {**base.headers, **spec.headers}
    if spec.models:
        attributes["models"] = tuple(spec.models)
        attributes["default_model"] = spec.default_model or spec.models[0]
    elif spec.default_model is not None:
        attributes["default_model"] = spec.default_model
    if spec.timeout is not None:
        attributes["timeout"] = (
            Timeout(total=spec.timeout) if isinstance(spec.timeout, float) else Timeout(**spec.timeout.model_dump())
        )
    if spec.retries is not None:
        attributes["max_retries"] = spec.retries
    if spec.retry_delay is not None:
        attributes["retry_delay"] = spec.retry_delay
    provider: type[Provider] = type(name, (_ConfiguredProvider, base), attributes)
    provider.endpoint_url()  # a URL the schema let through but the provider cannot use fails now
    provider.check_credentials()
    return provider


def build_groups(config: NetflyConfig, providers: Mapping[str, type[Provider]]) -> dict[str, type[RoutedProvider]]:
    """One routed provider per ``[models.PUBLIC]``, named PUBLIC."""
    return {name: _group(name, spec, providers) for name, spec in config.models.items()}


def _group(name: str, spec: ModelGroupConfig, providers: Mapping[str, type[Provider]]) -> type[RoutedProvider]:
    targets = []
    for target in spec.targets:
        provider = providers[target.provider]
        attributes: dict[str, Any] = {"label": provider.name()}
        if spec.strategy == "least-busy":
            attributes["open_streams"] = weakref.WeakSet()
        if target.model is not None:
            attributes["default_model"] = target.model
            if provider.models and target.model not in provider.models:
                raise ConfigurationError(f"models.{name}: provider {target.provider!r} does not serve "
                                         f"{target.model!r} (its models: {', '.join(provider.models)})")
        targets.append(type(provider.__name__, (_Target, provider), attributes))
    strategies: dict[str, Strategy] = {
        "weighted": Weighted({t: spec.targets[i].weight for i, t in enumerate(targets)}),
        "least-busy": LeastBusy(),
        "fastest": Fastest(),
    }
    return RetryProvider(
        targets,
        name=name,
        strategy=strategies.get(spec.strategy, Ordered()),
        hedge_after=spec.hedge_after if spec.strategy == "hedge" else None,
        failure_threshold=spec.failure_threshold,
        cooldown=spec.cooldown,
        max_retries=spec.retries,
        models=(),
        default_model="",  # each target asks for its own model
    )


class ConfigRouter(ModelRouter):
    """Exposes the file's public models (and their aliases) and nothing else; a file without
    ``[models]`` exposes its providers as ``"name/model"``, the first one also by bare model names."""

    def __init__(self, config: NetflyConfig) -> None:
        providers = build_providers(config)
        if not providers:
            raise ConfigurationError("the configuration declares no [providers]")
        super().__init__(next(iter(providers.values())), providers)
        self.groups = build_groups(config, providers)
        # Listed with the providers (the status page shows each group's circuits); routing by
        # name goes through resolve, which serves only the groups when there are any.
        self.providers.update({name.lower(): group for name, group in self.groups.items()})
        self.aliases = {alias: name for name, spec in config.models.items() for alias in spec.aliases}

    def resolve(self, model: str | None, *, param: str = "model") -> Route:
        if not self.groups:
            return super().resolve(model, param=param)
        public = self.aliases.get(model or "", model or "")
        group = self.groups.get(public)
        if group is None:
            raise GatewayError(400, f"model {model!r} is not served here; models: {', '.join(self.groups)}",
                               param=param, code="model_not_found")
        return Route(group, "", public)

    def names(self) -> list[str]:
        return sorted(self.groups) if self.groups else super().names()

    async def model_ids(self) -> list[tuple[str, str]]:
        if not self.groups:
            return await super().model_ids()
        return [(name, "netfly") for name in self.groups]

    def breakers(self) -> dict[str, CircuitBreakers]:
        """Each group's circuit breakers, by public model name (for the metrics)."""
        return {name: group.breakers for name, group in self.groups.items()}
