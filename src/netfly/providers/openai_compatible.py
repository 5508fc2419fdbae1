from __future__ import annotations

from typing import ClassVar

from ..provider import Provider


class OpenAICompatible(Provider):
    """Any server speaking OpenAI's chat completions API: llama.cpp, vLLM, Ollama, LM Studio, hosted APIs.

    Make one with a class (``class Mine(OpenAICompatible): url = "http://127.0.0.1:8080"``) or
    ``OpenAICompatible.configure(url=..., api_key=...)``. The API key, when not given, is read from
    ``$NETFLY_API_KEY`` (a separate variable so an OpenAI key is never sent to some other server).
    Sampling defaults are left to the server.
    """

    url = "http://127.0.0.1:8080"
    api_endpoint = "/v1/chat/completions"
    working = True
    default_model = "default"  # llama.cpp, vLLM with one model and LM Studio ignore or accept it
    api_key_env: ClassVar[str | None] = "NETFLY_API_KEY"  # typed so a subclass can turn it off
    max_retries = 3
    retry_delay = 1.0


class OpenAI(OpenAICompatible):
    """api.openai.com; reads ``$OPENAI_API_KEY``."""

    url = "https://api.openai.com"
    default_model = "gpt-4o-mini"
    api_key_env = "OPENAI_API_KEY"
    needs_auth = True
    working = True


class Ollama(OpenAICompatible):
    """A local Ollama server's OpenAI-compatible endpoint."""

    url = "http://127.0.0.1:11434"
    default_model = "llama3.2"
    api_key_env = "OLLAMA_API_KEY"  # Ollama needs none; set it when a proxy in front does
