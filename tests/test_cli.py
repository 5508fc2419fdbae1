"""The ``netfly`` command, run as a real subprocess against real loopback servers."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import aiohttp
from aiohttp import web

from .conftest import answer, netfly_serve, stream_bytes


async def run_cli(*args: str, stdin: bytes | None = None, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "netfly", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NETFLY_PROVIDER": "", **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_chat_streams_answer_to_stdout(scripted: Any) -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, answer("Сосны ", "шепчут 🌲"))

    server = await scripted(reply)
    code, out, err = await run_cli("chat", "--url", server.url, "--model", "m1", "--system", "be brief",
                                   "--temperature", "0.2", "--max-tokens", "7", "Write a poem")
    assert (code, out, err) == (0, "Сосны шепчут 🌲\n", "")
    body = server.requests[0]
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Write a poem"}]
    assert (body["model"], body["temperature"], body["max_tokens"], body["stream"]) == ("m1", 0.2, 7, True)


async def test_chat_reads_prompt_from_stdin(scripted: Any) -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, answer("ok"))

    server = await scripted(reply)
    code, out, _ = await run_cli("chat", "--url", server.url, "-", stdin=b"from stdin\n")
    assert (code, out) == (0, "ok\n")
    assert server.requests[0]["messages"][-1]["content"] == "from stdin\n"


async def test_retries_and_errors_are_one_line_on_stderr_with_exit_codes(scripted: Any) -> None:
    async def unavailable(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "overloaded"}}, status=503)

    async def rate_limited(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "0"})

    async def unauthorized(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "bad key"}}, status=401)

    server = await scripted(unavailable)
    code, out, err = await run_cli("chat", "--url", server.url, "--retries", "2", "hi")
    lines = err.strip().splitlines()
    assert code == 5 and out == ""
    assert len(lines) == 2, err
    assert "attempt 1/2 failed" in lines[0] and "retrying in" in lines[0] and "overloaded" in lines[0]
    assert lines[1].startswith("netfly: error: ServerError:") and "HTTP 503: overloaded" in lines[1]

    server = await scripted(rate_limited)
    code, _, err = await run_cli("chat", "--url", server.url, "--retries", "1", "hi")
    assert code == 4 and "RateLimitError" in err

    server = await scripted(unauthorized)
    code, _, err = await run_cli("chat", "--url", server.url, "hi")
    assert code == 3 and "AuthenticationError" in err and len(server.requests) == 1


async def test_connection_refused_and_bad_input_exit_codes(free_port: int) -> None:
    code, _, err = await run_cli("chat", "--url", f"http://127.0.0.1:{free_port}", "--retries", "1", "hi")
    assert code == 6 and "TransportError" in err and "cannot connect" in err
    code, _, err = await run_cli("chat", "--provider", "NoSuchThing", "hi")
    assert code == 2 and "unknown provider 'NoSuchThing'" in err and "FreeNetfly" in err
    code, _, err = await run_cli("chat", "--provider", "FreeNetfly", "--model", "gpt-9", "hi")
    assert code == 2 and "ModelNotSupportedError" in err and "gpt-3.5-turbo, gpt-4" in err
    code, _, err = await run_cli("chat", "--provider", "FreeNetfly", "   ")
    assert code == 2 and "prompt is empty" in err


async def test_models_lists_declared_and_served_models(scripted: Any) -> None:
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "llama-a"}, {"id": "qwen-b"}]})

    code, out, _ = await run_cli("models", "--provider", "freenetfly")
    assert (code, out) == (0, "gpt-3.5-turbo\ngpt-4\n")
    server = await scripted(models)
    code, out, _ = await run_cli("models", "--url", server.url)
    assert (code, out) == (0, "llama-a\nqwen-b\n")


async def test_python_dash_m_and_version() -> None:
    code, out, _ = await run_cli("--version")
    assert code == 0 and out.startswith("netfly ")
    code, _, err = await run_cli()
    assert code == 2 and "usage: netfly" in err


def test_exit_code_table_is_ordered_most_specific_first() -> None:
    from netfly import cli, errors

    assert cli.exit_code_for(errors.NetflyTimeoutError("t", "idle")) == 7
    assert cli.exit_code_for(errors.ProxyError("p")) == 6
    assert cli.exit_code_for(errors.ModelNotSupportedError("P", "m", ["a"])) == 2
    assert cli.exit_code_for(errors.StreamInterruptedError("s", "partial")) == 8
    assert cli.exit_code_for(errors.LocalServerError("the local model server was killed by SIGSEGV")) == 11


async def test_stats_are_printed_to_stderr(scripted: Any) -> None:
    async def unavailable(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "busy"}}, status=503)

    async def reply(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, answer("one ", "two ", "three"))

    server = await scripted(unavailable, reply)
    code, out, err = await run_cli("chat", "--url", server.url, "--stats", "hi")
    assert (code, out) == (0, "one two three\n")
    assert "chunks: 3  characters: 13" in err
    assert "attempt 1: " in err and "HTTP 503: busy" in err
    assert "attempt 2: " in err and ": ok (" in err


async def test_serve_writes_each_request_line_while_it_serves(scripted: Any) -> None:
    """The request log is buffered per turn of the event loop, never held until exit: every line of a
    burst of requests is on stderr while the gateway still serves, whole and in order."""
    async def reply(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, answer("ok"))

    server = await scripted(reply)
    process, port, _ = await netfly_serve("--url", server.url)
    assert process.stderr is not None
    try:
        async with aiohttp.ClientSession() as session:
            async def ask(number: int) -> int:
                async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions?n={number}",
                                        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}) as r:
                    await r.read()
                    return r.status

            assert await asyncio.gather(*(ask(n) for n in range(20))) == [200] * 20
        lines = [(await asyncio.wait_for(process.stderr.readline(), 5)).decode() for _ in range(20)]
        assert all(line.startswith("netfly: POST /v1/chat/completions 200 ") and line.endswith("\n")
                   for line in lines), lines
        assert process.returncode is None
    finally:
        process.terminate()
        await process.wait()


def test_log_lines_are_written_whole_and_within_pipe_buf_where_they_fit() -> None:
    """Several processes' lines on one pipe (``--workers``, a container's log) never interleave: each
    write holds whole lines, at most PIPE_BUF bytes unless one line alone is longer."""
    import select

    from netfly.cli.logsink import _pieces

    lines = [b"a" * 100 + b"\n"] * 100 + [b"b" * 5000 + b"\n"] + [b"c\n"] * 3
    pieces = _pieces(lines)
    assert b"".join(pieces) == b"".join(lines)
    assert all(piece.endswith(b"\n") for piece in pieces)
    assert all(len(piece) <= select.PIPE_BUF or piece.count(b"\n") == 1 for piece in pieces)
    assert len(pieces) == 5  # as few as fit: 40 + 40 + 20 lines of a, the long one, the short ones
