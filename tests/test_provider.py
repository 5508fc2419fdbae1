"""The provider surface: models, messages, the request body and headers, and every way to call it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from typing import Any

import pytest
from aiohttp import web

import netfly
from netfly import ConfigurationError, FreeNetfly, ModelNotSupportedError, OpenAICompatible, ServerError

from .conftest import answer, chunk, sse, stream_bytes

MESSAGES = [{"role": "user", "content": "hi"}]
SEED_BODY = {"stream": True, "model": "gpt-3.5-turbo", "temperature": 0.5, "presence_penalty": 0,
             "frequency_penalty": 0, "top_p": 1}


async def _fail_503(request: web.Request) -> web.StreamResponse:
    return web.json_response({"error": {"message": "busy"}}, status=503)


async def _hello(request: web.Request) -> web.StreamResponse:
    return await stream_bytes(request, answer("Hello", ", ", "world"))


async def _with_usage(request: web.Request) -> web.StreamResponse:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    return await stream_bytes(request, sse(
        chunk(role="assistant", model="served-model"), chunk("Hi", model="served-model"),
        chunk(" there", model="served-model"), chunk(finish="length", model="served-model"),
        chunk(choices=False, usage=usage, model="served-model"),
    ))


async def _slow_many(request: web.Request) -> web.StreamResponse:
    """Many chunks, slowly: a client that stops early leaves while the server is still writing."""
    return await stream_bytes(request, *(sse(chunk(f"{i} "), done=False) for i in range(200)), delay=0.02)


# -- get_model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["", None])
def test_empty_model_is_the_default(model: str | None) -> None:
    assert FreeNetfly.get_model(model) == "gpt-3.5-turbo"


def test_model_aliases_are_resolved() -> None:
    provider = FreeNetfly.configure(model_aliases={"smart": "gpt-4"})
    assert provider.get_model("smart") == "gpt-4"
    assert provider.get_model("gpt-4") == "gpt-4"


def test_unsupported_model_lists_the_supported_ones() -> None:
    with pytest.raises(ModelNotSupportedError) as caught:
        FreeNetfly.get_model("gpt-5-ultra")
    error = caught.value
    assert isinstance(error, ConfigurationError)
    assert error.supported == ["gpt-3.5-turbo", "gpt-4"]
    assert "gpt-5-ultra" in str(error) and "gpt-3.5-turbo" in str(error) and "gpt-4" in str(error)


def test_openai_compatible_without_models_passes_any_name() -> None:
    assert OpenAICompatible.models == ()
    assert OpenAICompatible.get_model("my-local-gguf") == "my-local-gguf"
    assert OpenAICompatible.get_model("") == OpenAICompatible.default_model


async def test_resolved_model_is_what_the_server_receives(scripted: Any) -> None:
    server = await scripted(_hello)
    provider = server.provider(model_aliases={"smart": "gpt-4"})
    await provider.create_async("smart", MESSAGES)
    await provider.create_async("", MESSAGES)
    assert [r["model"] for r in server.requests] == ["gpt-4", "gpt-3.5-turbo"]


async def test_unsupported_model_makes_no_request(scripted: Any) -> None:
    server = await scripted(_hello)
    with pytest.raises(ModelNotSupportedError):
        await server.provider().create_async("nope", MESSAGES)
    assert server.requests == []


# -- messages validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "complaint"),
    [
        (None, "messages must be a list"),
        ("hello", "messages must be a list"),
        (b"hello", "messages must be a list"),
        ({"role": "user", "content": "hi"}, "messages must be a list"),
        ([], "must not be empty"),
        (["hi"], "messages[0] must be a mapping"),
        ([{"content": "hi"}], "messages[0]['role']"),
        ([{"role": "", "content": "hi"}], "messages[0]['role']"),
        ([{"role": 1, "content": "hi"}], "messages[0]['role']"),
        ([{"role": "user"}], "messages[0] has no 'content'"),
        ([{"role": "user", "content": "ok"}, {"role": "user", "content": 5}], "messages[1]['content']"),
        ([{"role": "user", "content": None}], "messages[0]['content'] is None"),
        ([{"role": "user", "content": ["text"]}], "messages[0]['content'][0]"),
        ([{"role": "user", "content": [{"text": "no type"}]}], "messages[0]['content'][0]"),
    ],
)
async def test_bad_messages_fail_before_any_io(scripted: Any, messages: Any, complaint: str) -> None:
    server = await scripted(_hello)
    provider = server.provider()
    with pytest.raises(ConfigurationError) as caught:
        await provider.create_async("", messages)
    assert complaint in str(caught.value)
    with pytest.raises(ConfigurationError):
        provider.create_completion("", messages)  # the sync API fails at the call, not at iteration
    assert server.requests == []


async def test_content_parts_and_tool_call_messages_are_sent_as_given(scripted: Any) -> None:
    server = await scripted(_hello)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    assert await server.provider().create_async("", messages) == "Hello, world"
    assert server.requests[0]["messages"] == messages


# -- request body --------------------------------------------------------------------------------


async def test_body_defaults_are_the_seeds(scripted: Any) -> None:
    server = await scripted(_hello)
    await server.provider().create_async("", MESSAGES)
    assert server.requests[0] == {"messages": MESSAGES, **SEED_BODY}


async def test_kwargs_override_defaults_and_pass_through(scripted: Any) -> None:
    server = await scripted(_hello)
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    await server.provider().create_async(
        "gpt-4", MESSAGES, temperature=0.1, top_p=0.9, presence_penalty=0.5,
        max_tokens=64, stop=["\n\n", "END"], seed=7, tools=tools, tool_choice="auto",
    )
    assert server.requests[0] == {
        "messages": MESSAGES, "stream": True, "model": "gpt-4", "temperature": 0.1, "presence_penalty": 0.5,
        "frequency_penalty": 0, "top_p": 0.9, "max_tokens": 64, "stop": ["\n\n", "END"], "seed": 7,
        "tools": tools, "tool_choice": "auto",
    }


async def test_none_valued_kwargs_are_dropped(scripted: Any) -> None:
    server = await scripted(_hello)
    await server.provider().create_async("", MESSAGES, max_tokens=None, seed=None, temperature=None, stop=None)
    assert server.requests[0] == {"messages": MESSAGES, **SEED_BODY}  # None keeps the default


@pytest.mark.parametrize(("field", "value"), [("metadata", object()), ("stop", {"a", "b"}), ("seed", b"\x00")])
async def test_non_json_kwarg_names_the_field(scripted: Any, field: str, value: Any) -> None:
    server = await scripted(_hello)
    with pytest.raises(ConfigurationError) as caught:
        await server.provider().create_async("", MESSAGES, **{field: value})
    assert repr(field) in str(caught.value)
    assert server.requests == []


async def test_call_options_are_not_body_fields(scripted: Any) -> None:
    server = await scripted(_hello)
    text = await server.provider().create_async(
        "", MESSAGES, timeout=30, max_retries=2, retry_delay=0.01, headers={"X-Trace": "t-1"}, strict=True,
    )
    assert text == "Hello, world"
    assert server.requests[0] == {"messages": MESSAGES, **SEED_BODY}
    assert server.headers[0]["X-Trace"] == "t-1"


@pytest.mark.parametrize(
    ("option", "value"),
    [("max_retries", 0), ("max_retries", "3"), ("max_attempts", True), ("retry_delay", -1), ("timeout", -5),
     ("timeout", "soon"), ("headers", ["X-A: 1"]), ("max_line_bytes", 0), ("max_line_bytes", True),
     ("max_event_bytes", -1), ("strict", "yes"), ("extra_body", ["a"]), ("proxy", "socks5://"),
     ("proxy", "ftp://proxy.example")],
)
async def test_bad_call_options_fail_before_any_io(scripted: Any, option: str, value: Any) -> None:
    server = await scripted(_hello)
    with pytest.raises(ConfigurationError) as caught:
        await server.provider().create_async("", MESSAGES, **{option: value})
    assert option.split("_")[0] in str(caught.value)
    assert caught.value.param == option  # README: .param names the argument at fault
    assert server.requests == []


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("max_retires", "max_retries"), ("timout", "timeout"), ("max_attempt", "max_attempts"), ("header", "headers"),
     ("retry_dealy", "retry_delay"), ("extra_bdy", "extra_body")],
)
async def test_a_typo_of_a_call_option_is_refused_with_a_hint(scripted: Any, typo: str, meant: str) -> None:
    server = await scripted(_hello)
    with pytest.raises(ConfigurationError, match=f"unknown option '{typo}': did you mean '{meant}'") as caught:
        await server.provider().create_async("", MESSAGES, **{typo: 1})
    assert caught.value.param == typo
    assert server.requests == []


async def test_body_fields_and_extra_body_pass_through_and_extra_body_wins(scripted: Any) -> None:
    server = await scripted(_hello)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    await server.provider(OpenAICompatible).create_async(
        "", MESSAGES, temperature=0.2, tools=tools, response_format={"type": "text"}, top_p=None,
        extra_body={"temperature": 0.7, "timeout": 5, "max_retires": 1, "stop": None, "vendor_x": {"k": 1}},
    )
    sent = server.requests[0]
    assert sent["tools"] == tools and sent["response_format"] == {"type": "text"}
    # extra_body is merged last and as given: even names of call options are body fields there
    assert (sent["temperature"], sent["timeout"], sent["max_retires"], sent["vendor_x"]) == (0.7, 5, 1, {"k": 1})
    assert sent["stop"] is None and "top_p" not in sent


async def test_max_attempts_counts_attempts_and_excludes_its_old_name(scripted: Any) -> None:
    server = await scripted(_fail_503, _fail_503, _hello)
    with pytest.raises(ServerError):
        await server.provider().create_async("", MESSAGES, max_attempts=2)
    assert len(server.requests) == 2
    with pytest.raises(ConfigurationError, match="not both"):
        await server.provider().create_async("", MESSAGES, max_attempts=2, max_retries=2)
    assert len(server.requests) == 2


# -- headers -------------------------------------------------------------------------------------


@pytest.fixture
async def header_server(aiohttp_server: Any) -> Any:
    """A server that keeps every received header line, repeats included."""
    seen: list[list[tuple[str, str]]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(list(request.headers.items()))
        return await _hello(request)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    server = await aiohttp_server(app)
    server.seen = seen
    server.base_url = str(server.make_url("")).rstrip("/")
    return server


def _all(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name.lower()]


async def test_browser_like_headers_follow_url(header_server: Any) -> None:
    class Local(FreeNetfly):
        url = header_server.base_url

    assert await Local.create_async("", MESSAGES) == "Hello, world"
    [headers] = header_server.seen
    assert _all(headers, "origin") == [header_server.base_url]
    assert _all(headers, "referer") == [header_server.base_url + "/"]
    assert _all(headers, "user-agent")[0].startswith("Mozilla/5.0")
    assert _all(headers, "content-type") == ["application/json"]


async def test_header_overrides_replace_not_duplicate(header_server: Any) -> None:
    # Class headers and per-call headers override the defaults whatever the letter case.
    provider = FreeNetfly.configure(url=header_server.base_url, headers={"User-Agent": "class-agent/1", "X-Org": "o"})
    await provider.create_async("", MESSAGES)
    await provider.create_async("", MESSAGES, headers={"user-agent": "call-agent/2", "REFERER": "https://r.example/"})
    first, second = header_server.seen
    assert _all(first, "user-agent") == ["class-agent/1"]
    assert _all(first, "x-org") == ["o"]
    assert _all(second, "user-agent") == ["call-agent/2"]
    assert _all(second, "referer") == ["https://r.example/"]
    assert _all(second, "x-org") == ["o"]


async def test_api_key_replaces_an_authorization_header_of_any_case(header_server: Any) -> None:
    provider = OpenAICompatible.configure(url=header_server.base_url)
    await provider.create_async("", MESSAGES, api_key="k-123456", headers={"Authorization": "Bearer other"})
    [headers] = header_server.seen
    assert _all(headers, "authorization") == ["Bearer k-123456"]


async def test_openai_compatible_sends_no_browser_headers(header_server: Any) -> None:
    await OpenAICompatible.configure(url=header_server.base_url).create_async("", MESSAGES)
    [headers] = header_server.seen
    assert _all(headers, "origin") == []
    assert _all(headers, "user-agent") == [f"netfly/{netfly.__version__}"]


# -- making providers ----------------------------------------------------------------------------


async def test_configure_makes_a_provider_class(scripted: Any) -> None:
    server = await scripted(_hello)
    provider = OpenAICompatible.configure(url=server.url, api_key="k-123456", name="my-server")
    assert issubclass(provider, OpenAICompatible)
    assert provider.name() == "my-server"
    assert await provider.create_async("any-model", MESSAGES) == "Hello, world"
    assert server.requests[0]["model"] == "any-model"
    assert server.headers[0]["Authorization"] == "Bearer k-123456"
    assert OpenAICompatible.api_key is None  # the base class is untouched


def test_configure_keeps_the_subclass_and_refuses_methods() -> None:
    configured = OpenAICompatible.configure(url="http://127.0.0.1:1", name="Mine")
    assert issubclass(configured, OpenAICompatible) and configured.name() == "Mine"
    for method in ("stream", "complete", "get_model", "endpoint_url"):
        with pytest.raises(ConfigurationError, match=f"{method}: a method, not a setting"):
            OpenAICompatible.configure(**{method: lambda *a: None})


def test_configure_rejects_unknown_attributes() -> None:
    with pytest.raises(ConfigurationError) as caught:
        OpenAICompatible.configure(url="http://127.0.0.1:1", api_kye="x")
    assert "api_kye" in str(caught.value)


async def test_subclassing_changes_the_target(scripted: Any) -> None:
    server = await scripted(_hello)

    class Local(FreeNetfly):
        url = server.url

    assert await Local.create_async("gpt-4", MESSAGES) == "Hello, world"
    assert server.requests[0]["model"] == "gpt-4"


@pytest.mark.parametrize("url", ["", "127.0.0.1:8080", "ftp://host", "http://"])
async def test_bad_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError):
        await OpenAICompatible.configure(url=url).create_async("", MESSAGES)


# -- the ways to call ----------------------------------------------------------------------------


async def test_create_async_and_complete(scripted: Any) -> None:
    server = await scripted(_with_usage)
    provider = server.provider()
    assert await provider.create_async("", MESSAGES) == "Hi there"
    result = await provider.complete("", MESSAGES)
    assert (result.text, result.finish_reason, result.model) == ("Hi there", "length", "served-model")
    assert result.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert str(result) == "Hi there"


async def test_stream_exposes_stats_and_result(scripted: Any) -> None:
    server = await scripted(_with_usage)
    stream = server.provider().stream("", MESSAGES)
    assert [t async for t in stream] == ["Hi", " there"]
    assert stream.result is not None and stream.result.finish_reason == "length"
    assert (stream.stats.chunks, stream.stats.characters, stream.stats.model) == (2, 8, "served-model")
    assert len(stream.stats.attempts) == 1 and stream.stats.attempts[0].error is None


async def test_sync_create_completion_yields_the_same_chunks(scripted: Any) -> None:
    server = await scripted(_hello)
    provider = server.provider()
    expected = [c async for c in provider.create_async_generator("", MESSAGES)]
    got = await asyncio.to_thread(lambda: list(provider.create_completion("", MESSAGES)))
    assert got == expected == ["Hello", ", ", "world"]


async def test_complete_sync_pairs_with_complete(scripted: Any) -> None:
    server = await scripted(_hello)
    result = await asyncio.to_thread(server.provider().complete_sync, "", MESSAGES)
    assert (result.text, result.finish_reason) == ("Hello, world", "stop")


async def test_sync_create_returns_the_result(scripted: Any) -> None:
    server = await scripted(_with_usage)
    result = await asyncio.to_thread(server.provider().create, "", MESSAGES)
    assert (result.text, result.finish_reason, result.model) == ("Hi there", "length", "served-model")


async def test_sync_create_completion_stream_false(scripted: Any) -> None:
    async def whole(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["stream"] is False
        return web.json_response({"id": "c", "object": "chat.completion", "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "all at once"}, "finish_reason": "stop"}]})

    server = await scripted(whole)
    provider = server.provider()
    got = await asyncio.to_thread(lambda: list(provider.create_completion("", MESSAGES, stream=False)))
    assert got == ["all at once"]


async def _wait_for(condition: Any, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_breaking_out_of_sync_loop_closes_the_connection(scripted: Any) -> None:
    server = await scripted(_slow_many)
    provider = server.provider()

    def first_three() -> list[str]:
        got = []
        for text in provider.create_completion("", MESSAGES):
            got.append(text)
            if len(got) == 3:
                break
        return got

    assert await asyncio.to_thread(first_three) == ["0 ", "1 ", "2 "]
    await _wait_for(lambda: server.disconnects == 1)  # well before the 4 s the full answer takes


async def test_breaking_out_of_async_generator_closes_the_connection(scripted: Any) -> None:
    server = await scripted(_slow_many)
    generator = server.provider().create_async_generator("", MESSAGES)
    async for text in generator:
        assert text == "0 "
        break
    await generator.aclose()
    await _wait_for(lambda: server.disconnects == 1)


async def test_aclose_then_reuse(scripted: Any) -> None:
    server = await scripted(_hello)
    provider = server.provider()
    assert await provider.create_async("", MESSAGES) == "Hello, world"
    await netfly.aclose()
    await netfly.aclose()  # closing twice is harmless
    assert await provider.create_async("", MESSAGES) == "Hello, world"
    assert len(server.requests) == 2


async def test_connections_are_reused_across_calls(aiohttp_server: Any) -> None:
    peers: list[Any] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return await _hello(request)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    server = await aiohttp_server(app)
    provider = OpenAICompatible.configure(url=str(server.make_url("")).rstrip("/"))
    for _ in range(3):
        assert await provider.create_async("", MESSAGES) == "Hello, world"
    assert len(set(peers)) == 1  # one pooled keep-alive connection, not one per call


# -- no "Unclosed client session" when a script uses netfly the plain way -------------------------

_SEED_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from netfly import FreeNetfly

    class Local(FreeNetfly):
        url = sys.argv[1]

    async def main():
        model = "gpt-3.5-turbo"
        messages = [{"role": "user", "content": "Write a short poem about nature."}]
        try:
            async for chunk in Local.create_async_generator(model=model, messages=messages):
                print(chunk, end="")
        except Exception as e:
            print(f"An error occurred: {e}")

    if __name__ == "__main__":
        asyncio.run(main())
    """
)

_EARLY_EXIT_AND_SYNC_SCRIPT = textwrap.dedent(
    """
    import asyncio, gc, sys
    from netfly import FreeNetfly

    class Local(FreeNetfly):
        url = sys.argv[1]

    messages = [{"role": "user", "content": "hi"}]

    async def main():
        async for chunk in Local.create_async_generator(model="", messages=messages):
            print(chunk, end="|")
            break  # leave early, without aclose: the generator is finalised by the loop
        print(await Local.create_async("", messages), end="|")

    asyncio.run(main())
    gc.collect()
    print("".join(Local.create_completion("", messages)), end="|")
    print(Local.create("", messages).text, end="")
    """
)


async def _run_script(script: str, *args: str) -> tuple[int, str, str]:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-W", "always::ResourceWarning", "-c", script, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONASYNCIODEBUG": "", "PYTHONWARNINGS": ""},
    )
    out, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()


async def test_seed_script_leaves_no_unclosed_session(scripted: Any) -> None:
    server = await scripted(_hello)
    code, out, err = await _run_script(_SEED_SCRIPT, server.url)
    assert (code, out, err) == (0, "Hello, world", "")
    assert json.loads(json.dumps(server.requests[0]))["model"] == "gpt-3.5-turbo"


async def test_early_exit_and_sync_use_leave_no_unclosed_session(scripted: Any) -> None:
    server = await scripted(_hello)
    code, out, err = await _run_script(_EARLY_EXIT_AND_SYNC_SCRIPT, server.url)
    assert (code, err) == (0, "")
    assert out == "Hello|Hello, world|Hello, world|Hello, world"
    assert len(server.requests) == 4

