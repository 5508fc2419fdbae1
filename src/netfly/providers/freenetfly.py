from __future__ import annotations

from ..provider import Provider


class FreeNetfly(Provider):
    """gpt4free's FreeNetfly preset: an OpenAI-style endpoint behind a browser front end."""

    url = "https://free.netfly.top"
    api_endpoint = "/api/openai/v1/chat/completions"
    # Not claimed: the public service stopped answering, and no live probe has shown otherwise.
    # `await FreeNetfly.check()` / `netfly check` measures it.
    working = False
    default_model = "gpt-3.5-turbo"
    models = ("gpt-3.5-turbo", "gpt-4")
    default_params = {"temperature": 0.5, "presence_penalty": 0, "frequency_penalty": 0, "top_p": 1}
    browser_headers = True
    max_retries = 5
    retry_delay = 2.0
