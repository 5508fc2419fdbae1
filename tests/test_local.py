"""``Local``: a real llama.cpp server in a child process, the real SmolLM2 model, netfly's own engine.

One server is shared by the whole session (``local_server``); tests that need a server of their own
(failures, restarts, subprocesses) start one and stop it. Every test here is marked ``local``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from netfly import ConfigurationError, LocalServerError, StreamInterruptedError, get_provider
from netfly.gateway import bound_port, create_app, start
from netfly.providers.llama_server import LlamaServer
from netfly.providers.local import Local, is_available

pytestmark = pytest.mark.local


def _unavailable_reason() -> str:
    try:
        Local.server_config()
    except ConfigurationError as error:
        return f"Local cannot run here: {error}"
    return ""


needs_local = pytest.mark.skipif(not is_available(), reason=_unavailable_reason() or "available")
needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds child processes through /proc")

POEM = [{"role": "user", "content": "Write a short poem about nature."}]
LONG = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
MARKER_ENV = "NETFLY_TEST_MARKER"


@pytest.fixture(scope="session")
def local_server() -> Iterator[LlamaServer]:
    server = Local.server()
    server.start_sync(Local.startup_timeout)
    yield server
    Local.stop()


def configured(**attributes: Any) -> type[Local]:
    return cast("type[Local]", Local.configure(**attributes))


async def non_streamed(server: LlamaServer, messages: list[dict[str, str]], **params: Any) -> dict[str, Any]:
    """The same server's answer with ``stream: false``, fetched without netfly."""
    body = {"messages": messages, "stream": False, "model": server.config.model_alias, **params}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.base_url}/v1/chat/completions", json=body) as response:
            assert response.status == 200
            return cast("dict[str, Any]", await response.json())


def llama_servers_marked(marker: str) -> list[int]:
    """Live ``llama_cpp.server`` processes whose environment carries ``marker`` (zombies excluded)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                if b"llama_cpp.server" not in file.read():
                    continue
            with open(f"/proc/{entry}/environ", "rb") as file:
                environment = file.read().split(b"\0")
        except OSError:
            continue
        if f"{MARKER_ENV}={marker}".encode() in environment:
            found.append(int(entry))
    return found


def wait_for(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def read_some(stream: Any, at_least: int, timeout: float) -> bytes:
    """Read from a subprocess pipe until ``at_least`` bytes arrived (or EOF, or the timeout)."""
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < at_least and time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 0.1)
        if ready:
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            data += chunk
    return data


# -- answers from the shared server ------------------------------------------------------------


@needs_local
async def test_streamed_text_equals_the_servers_non_streamed_answer(local_server: LlamaServer) -> None:
    params = {"temperature": 0, "seed": 7, "max_tokens": 96}
    # llama-cpp-python reuses the previous request's prompt prefix, and a first request for a
    # prompt takes another numeric path: at temperature 0 its answer can differ from the next
    # ones. Warming up with the same messages puts both answers compared below in one cache state.
    await non_streamed(local_server, POEM, **params)
    chunks = [c async for c in Local.create_async_generator(None, POEM, **params)]
    reference = await non_streamed(local_server, POEM, **params)

    expected = reference["choices"][0]["message"]["content"]
    assert len(chunks) > 5  # streamed token by token, not in one piece
    assert "".join(chunks) == expected
    assert len(expected.split()) > 10


@needs_local
async def test_max_tokens_is_honoured(local_server: LlamaServer) -> None:
    short = await Local.complete(None, LONG, temperature=0, max_tokens=5)
    longer = await Local.complete(None, LONG, temperature=0, max_tokens=40)

    assert short.finish_reason == "length"
    assert short.text and longer.text.startswith(short.text) and len(longer.text) > len(short.text)
    assert short.model == local_server.config.model_alias
    reference = await non_streamed(local_server, LONG, temperature=0, max_tokens=5)
    assert reference["usage"]["completion_tokens"] == 5
    assert reference["choices"][0]["message"]["content"] == short.text


@needs_local
async def test_a_system_message_changes_the_answer(local_server: LlamaServer) -> None:
    question = {"role": "user", "content": "What is the capital of France?"}
    plain = await Local.create_async(None, [question], temperature=0, max_tokens=48)
    pirate = await Local.create_async(
        None, [{"role": "system", "content": "You are a pirate. Always answer like a pirate."}, question],
        temperature=0, max_tokens=48,
    )
    assert plain and pirate
    assert plain != pirate


@needs_local
async def test_four_concurrent_streams_through_one_provider_all_complete(local_server: LlamaServer) -> None:
    prompts = ["a cat", "the sea", "a mountain", "the moon"]

    async def ask(topic: str) -> Any:
        return await Local.complete(
            None, [{"role": "user", "content": f"Write one sentence about {topic}."}], temperature=0, max_tokens=32
        )

    results = await asyncio.wait_for(asyncio.gather(*(ask(p) for p in prompts)), 120)

    # A stream cut short by the server (llama.cpp's default when another request waits) ends with
    # [DONE] but no finish_reason.
    assert [r.finish_reason in ("stop", "length") for r in results] == [True] * 4
    assert all(r.text.strip() for r in results)
    assert len({r.text for r in results}) == 4
    alone = await ask(prompts[2])
    assert alone.text == results[2].text


@needs_local
def test_the_sync_api_works(local_server: LlamaServer) -> None:
    chunks = list(Local.create_completion(None, POEM, temperature=0, max_tokens=12))
    result = Local.create(None, POEM, temperature=0, max_tokens=12)

    assert len(chunks) > 1
    assert "".join(chunks) == result.text
    assert result.finish_reason in ("stop", "length")


@needs_local
def test_local_is_registered_and_running(local_server: LlamaServer) -> None:
    assert get_provider("local") is Local
    assert Local.is_running()
    assert local_server.base_url.startswith("http://127.0.0.1:")
    assert Local.endpoint_url() == local_server.base_url + "/v1/chat/completions"


@needs_local
async def test_models_names_the_served_model_without_starting_anything() -> None:
    provider = configured(n_ctx=1024)
    models = await provider.list_models()
    assert models == [Path(provider.server_config().model_path).stem]
    assert provider.get_model(None) == models[0]
    assert not provider.is_running()


# -- lifecycle: own servers ---------------------------------------------------------------------


@needs_local
async def test_aclose_stops_the_child_and_a_dead_child_is_restarted(caplog: pytest.LogCaptureFixture) -> None:
    provider = configured(n_ctx=512)  # a configuration of its own: not the shared server
    caplog.set_level(logging.INFO, logger="netfly.local")
    try:
        assert not provider.is_running()
        first = await provider.create_async(None, POEM, temperature=0, max_tokens=8)
        server = provider.server()
        pid, log = server.pid, server.log_path
        assert pid is not None and log is not None and os.path.exists(log)
        messages = [r.getMessage() for r in caplog.records]
        assert any(m.startswith("starting local model SmolLM2") for m in messages)  # the CLI's hook
        assert any(" ready in " in m for m in messages)

        os.kill(pid, signal.SIGKILL)  # it dies behind our back: the next call starts a new one
        assert wait_for(lambda: server.pid is not None and not server.running, 5)
        again = await provider.create_async(None, POEM, temperature=0, max_tokens=8)
        assert again == first
        assert server.pid not in (None, pid)
    finally:
        await provider.aclose()
    assert server.pid is None and not provider.is_running()
    assert not os.path.exists(log)  # the temporary log of a server that worked is removed


@needs_local
async def test_a_bad_model_file_fails_fast_with_an_error_naming_the_log(tmp_path: Path) -> None:
    model = tmp_path / "broken.gguf"
    model.write_bytes(os.urandom(4096))
    log = tmp_path / "server.log"
    provider = configured(model_path=str(model), log_path=str(log), startup_timeout=60)

    started = time.monotonic()
    with pytest.raises(LocalServerError) as caught:
        await provider.create_async(None, POEM)
    elapsed = time.monotonic() - started

    message = str(caught.value)
    assert elapsed < 30, elapsed
    assert "the local model server exited with status 1 during startup" in message
    assert "last lines: " in message and "Failed to load model" in message
    assert str(log) in message and log.read_text().strip()
    assert not provider.is_running()
    provider.stop()


@needs_local
async def test_a_server_that_never_answers_fails_at_the_deadline(tmp_path: Path) -> None:
    model = tmp_path / "never.gguf"
    os.mkfifo(model)  # opening it blocks until a writer comes: the load hangs
    provider = configured(model_path=str(model), log_path=str(tmp_path / "server.log"), startup_timeout=2)

    started = time.monotonic()
    with pytest.raises(LocalServerError, match="the local model server did not answer within 2 s") as caught:
        await provider.create_async(None, POEM)
    elapsed = time.monotonic() - started

    assert 2 <= elapsed < 5, elapsed  # the deadline, then SIGTERM and reaping
    assert str(tmp_path / "server.log") in str(caught.value)
    server = provider.server()
    assert server.pid is not None and not os.path.exists(f"/proc/{server.pid}")  # killed and reaped
    provider.stop()


# -- crashes: own servers ---------------------------------------------------------------------------


def broken_model(tmp_path: Path) -> str:
    """A GGUF file llama.cpp refuses: its child exits with status 1 a moment after it starts."""
    model = tmp_path / "broken.gguf"
    model.write_bytes(os.urandom(4096))
    return str(model)


def assert_names_the_crash(error: LocalServerError, how: str) -> None:
    message = str(error)
    assert message.startswith(f"the local model server {how}"), message
    assert error.log_path is not None and f"; log: {error.log_path}" in message
    assert error.log_tail and f"last lines: {' | '.join(error.log_tail)}" in message
    assert len(error.log_tail) <= 5 and all(len(line) <= 240 for line in error.log_tail)


@needs_local
@needs_proc
async def test_a_child_killed_mid_answer_keeps_the_text_and_the_next_call_starts_a_new_one() -> None:
    provider = configured(n_ctx=1536)
    try:
        stream = provider.stream(None, LONG, temperature=0, max_tokens=1500)
        received: list[str] = []
        with pytest.raises(StreamInterruptedError) as caught:
            async for text in stream:
                received.append(text)
                if len(received) == 10:
                    pid = provider.server().pid
                    assert pid is not None
                    os.kill(pid, signal.SIGSEGV)

        assert len(received) >= 10 and caught.value.partial_text == "".join(received)
        crash = caught.value.__cause__
        assert isinstance(crash, LocalServerError) and crash.returncode == -signal.SIGSEGV
        assert_names_the_crash(crash, "was killed by SIGSEGV")
        assert "stream interrupted after" in str(caught.value) and "killed by SIGSEGV" in str(caught.value)
        assert len(stream.stats.attempts) == 1  # no retry against the dead port
        assert not os.path.exists(f"/proc/{pid}")  # reaped: not even a zombie is left
        state = provider.engine_state()
        assert state.state == "crashed" and state.reason == "the local model server was killed by SIGSEGV"

        again = await provider.create_async(None, POEM, temperature=0, max_tokens=8)
        new_pid = provider.server().pid
        assert again and new_pid not in (None, pid)
        assert str(provider.engine_state()) == f"ready (pid {new_pid})"
    finally:
        await provider.aclose()
    assert not os.path.exists(f"/proc/{new_pid}")


@needs_local
@needs_proc
async def test_a_child_killed_before_the_first_token_is_a_local_server_error() -> None:
    provider = configured(n_ctx=1792)
    # A long prompt keeps the child busy reading it for a while before it sends anything.
    prompt = [{"role": "user", "content": "Count these words: " + "river stone cloud " * 400}]
    try:
        server = await provider.start()
        pid = server.pid
        assert pid is not None
        stream = provider.stream(None, prompt, temperature=0, max_tokens=16)
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.3)
        assert not first.done()
        os.kill(pid, signal.SIGSEGV)
        killed = time.monotonic()
        with pytest.raises(LocalServerError) as caught:
            await first
        assert time.monotonic() - killed < 3

        assert_names_the_crash(caught.value, "was killed by SIGSEGV")
        assert stream.text == "" and stream.stats.time_to_first_token is None
        assert len(stream.stats.attempts) == 1  # not retried: the child is gone
        assert not os.path.exists(f"/proc/{pid}")
        assert await provider.create_async(None, POEM, temperature=0, max_tokens=8)
        assert provider.server().pid not in (None, pid)
    finally:
        await provider.aclose()


@needs_local
async def test_an_answer_resets_the_crash_count(caplog: pytest.LogCaptureFixture) -> None:
    provider = configured(n_ctx=1600, restart_limit=2)
    caplog.set_level(logging.WARNING, logger="netfly.local")
    try:
        pids = []
        for _ in range(3):  # two crashes, each followed by an answer: never two in a row
            assert await provider.create_async(None, POEM, temperature=0, max_tokens=4)
            pid = provider.server().pid
            assert pid is not None and pid not in pids
            pids.append(pid)
            os.kill(pid, signal.SIGSEGV)
            assert wait_for(lambda: provider.engine_state().state == "crashed", 5)
    finally:
        await provider.aclose()
    warnings = [r.getMessage() for r in caplog.records if r.name == "netfly.local" and r.levelno == logging.WARNING]
    killed = "the local model server was killed by SIGSEGV"
    assert warnings == [f"{killed} (pid {pid}); starting it again" for pid in pids[:2]]


@needs_local
async def test_a_child_that_keeps_failing_is_not_restarted_until_the_window_passes_or_stop(tmp_path: Path) -> None:
    provider = configured(model_path=broken_model(tmp_path), restart_limit=2, restart_window=8)
    try:
        for _ in range(2):
            with pytest.raises(LocalServerError, match="exited with status 1 during startup"):
                await provider.create_async(None, POEM)
        pid = provider.server().pid

        started = time.monotonic()
        with pytest.raises(LocalServerError) as paused:
            await provider.create_async(None, POEM)
        assert time.monotonic() - started < 0.5 and provider.server().pid == pid  # nothing spawned
        assert_names_the_crash(paused.value, "exited with status 1 during startup; not restarted: 2 failures "
                                             "in a row within 8 s (next try in ")
        assert "or after Local.stop())" in str(paused.value)
        assert paused.value.retry_after is not None and 0 < paused.value.retry_after <= 8
        state = provider.engine_state()
        assert state.state == "crashed" and state.reason is not None and "; restarts paused for " in state.reason

        await asyncio.sleep(paused.value.retry_after + 0.1)  # the window has passed: one more try
        with pytest.raises(LocalServerError, match=r"during startup; log: "):
            await provider.create_async(None, POEM)
        assert provider.server().pid != pid

        provider.stop()  # forgets the failures
        assert provider.engine_state().state == "not running"
        with pytest.raises(LocalServerError, match=r"during startup; log: "):
            await provider.create_async(None, POEM)
    finally:
        provider.stop()


@needs_local
async def test_the_gateway_answers_503_for_a_crashed_local_model_and_health_says_why(tmp_path: Path) -> None:
    provider = configured(model_path=broken_model(tmp_path), restart_limit=1)
    runner = await start(create_app(provider, providers={}), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{bound_port(runner)}"
    body = {"model": provider.get_model(None), "messages": POEM, "stream": True}
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/health") as response:
                assert (await response.json())["local"]["state"] == "not running"
            for _ in range(2):  # the start fails, then restarts are paused
                async with session.post(url + "/v1/chat/completions", json=body) as response:
                    assert response.status == 503
                    error = (await response.json())["error"]
                    assert error["type"] == "server_error" and error["code"] == "local_model_unavailable"
                    assert error["message"].startswith("the local model server exited with status 1 during startup")
            assert int(response.headers["Retry-After"]) > 50
            async with session.get(url + "/health") as response:
                health = await response.json()
    finally:
        await runner.cleanup()
        provider.stop()
    assert health["status"] == "ok" and health["local"]["provider"] == provider.name()
    assert health["local"]["state"] == "crashed"
    reason = health["local"]["reason"]
    assert reason.startswith("the local model server exited with status 1 during startup; restarts paused for ")


@needs_local
def test_the_cli_names_a_crashed_local_model_in_one_line_with_its_exit_code(tmp_path: Path) -> None:
    env = {**marked_environment(uuid.uuid4().hex), "NETFLY_LOCAL_MODEL": broken_model(tmp_path)}
    result = subprocess.run([*CLI, "chat", "--provider", "Local", "Hi"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 11
    lines = result.stderr.splitlines()
    assert lines[0] == "netfly: starting local model…"
    assert len(lines) == 2 and lines[1].startswith(
        "netfly: error: LocalServerError: the local model server exited with status 1 during startup; log: "
    ), result.stderr


@needs_local
async def test_check_reports_the_engine_state() -> None:
    from netfly.cli.format import format_health_table
    from netfly.health import check_provider

    provider = configured(n_ctx=1700)
    try:
        result = await check_provider(provider)
        pid = provider.server().pid
    finally:
        await provider.aclose()
    assert result.ok and result.engine == f"ready (pid {pid})"
    assert format_health_table([result]).splitlines()[1].endswith(f"(engine ready (pid {pid}))")


def test_a_missing_model_file_is_a_configuration_error_before_anything_starts(tmp_path: Path) -> None:
    provider = configured(model_path=str(tmp_path / "absent.gguf"))
    if not provider.installed() and "not installed" in _unavailable_reason():
        pytest.skip(_unavailable_reason())
    with pytest.raises(ConfigurationError, match=r"local model file not found: .*absent\.gguf"):
        provider.stream(None, POEM)


def test_without_the_extra_the_error_says_how_to_install_it() -> None:
    # A fresh interpreter where llama_cpp cannot be imported, as when the extra is not installed.
    script = textwrap.dedent("""
        import sys
        sys.modules["llama_cpp"] = None
        from netfly import ConfigurationError
        from netfly.providers.local import Local, is_available
        assert not is_available()
        try:
            Local.create_completion(None, [{"role": "user", "content": "hi"}])
        except ConfigurationError as error:
            print(error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir "netfly[local]"' in result.stdout
    assert "llama_cpp is not installed" in result.stdout


# -- no orphan: subprocesses ------------------------------------------------------------------------

CLI = [sys.executable, "-c", textwrap.dedent("""
    import signal, sys
    # A test runner started in the background may hand us SIGINT ignored; a terminal would not.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from netfly.cli import main
    sys.exit(main(sys.argv[1:]))
""")]


def marked_environment(marker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NETFLY_PROVIDER"}
    return {**env, MARKER_ENV: marker, "PYTHONUNBUFFERED": "1"}


@needs_local
@needs_proc
def test_readme_main_job_streams_from_local_by_default_and_leaves_no_server() -> None:
    # README's main job, verbatim: no provider chosen, so the installed local model answers.
    marker = uuid.uuid4().hex
    with subprocess.Popen(
        [*CLI, "chat", "Write a short poem about nature."],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=marked_environment(marker),
    ) as cli:
        seen = wait_for(lambda: bool(llama_servers_marked(marker)) or cli.poll() is not None, 60)
        child_seen = bool(llama_servers_marked(marker))
        out, err = cli.communicate(timeout=60)
    assert seen and child_seen, err.decode()
    assert cli.returncode == 0, err.decode()
    assert len(out.decode().split()) >= 5, out.decode()
    assert err.decode().startswith("netfly: starting local model…"), err.decode()
    assert llama_servers_marked(marker) == []


@needs_local
@needs_proc
def test_no_server_remains_after_sigint_mid_answer() -> None:
    marker = uuid.uuid4().hex
    with subprocess.Popen(
        [*CLI, "chat", "--provider", "Local", "--max-tokens", "1500", LONG[0]["content"]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=marked_environment(marker),
    ) as cli:
        assert cli.stdout is not None
        partial = read_some(cli.stdout, 40, 60)  # the answer is streaming
        assert len(partial) >= 40 and cli.poll() is None
        assert llama_servers_marked(marker)
        cli.send_signal(signal.SIGINT)
        _, err = cli.communicate(timeout=30)
    assert cli.returncode == 130, err.decode()
    assert llama_servers_marked(marker) == []


@needs_local
@needs_proc
def test_no_server_remains_when_the_parent_is_killed() -> None:
    # SIGKILL runs no cleanup at all: the child must notice on its own (its stdin pipe closes).
    marker = uuid.uuid4().hex
    script = textwrap.dedent("""
        import asyncio, sys
        from netfly.providers.local import Local

        async def main():
            async for text in Local.create_async_generator(None, [{"role": "user", "content": sys.argv[1]}]):
                print(text, end="", flush=True)

        asyncio.run(main())
    """)
    with subprocess.Popen(
        [sys.executable, "-c", script, LONG[0]["content"]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=marked_environment(marker),
    ) as parent:
        assert parent.stdout is not None
        assert len(read_some(parent.stdout, 20, 60)) >= 20
        children = llama_servers_marked(marker)
        assert children
        parent.kill()
        parent.communicate(timeout=30)
    assert wait_for(lambda: not llama_servers_marked(marker), 10), children


@needs_local
@needs_proc
def test_gateway_serves_the_local_model_by_default_to_the_openai_sdk() -> None:
    # README's gateway example: `netfly serve` with no provider chosen relays the local model.
    import re

    import openai

    marker = uuid.uuid4().hex
    with subprocess.Popen(
        [*CLI, "serve", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=marked_environment(marker),
    ) as gateway:
        assert gateway.stderr is not None
        line = b""
        deadline = time.monotonic() + 30
        while b"listening on" not in line and time.monotonic() < deadline:
            line = gateway.stderr.readline()
        found = re.search(rb"http://127\.0\.0\.1:(\d+)", line)
        assert found, line
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{int(found.group(1))}/v1", api_key="unused", timeout=60, max_retries=0
        )
        models = [m.id for m in client.models.list().data]
        model = Local.get_model(None)  # the model file's name, listed bare for the default provider
        assert models[0] == model and f"Local/{model}" in models
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Write a short poem about nature."}],
            stream=True, max_tokens=32, temperature=0,
        )
        pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
        assert len(pieces) > 5 and len("".join(pieces).split()) >= 5
        assert llama_servers_marked(marker)
        gateway.send_signal(signal.SIGINT)
        gateway.communicate(timeout=30)
    assert gateway.returncode == 0
    assert llama_servers_marked(marker) == []
