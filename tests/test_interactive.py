"""``netfly chat`` as a conversation: a real subprocess on a pseudo-terminal, a real loopback upstream."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from .conftest import answer, chunk, sse, stream_bytes
from .test_cli import run_cli

DEADLINE = 20.0


class Terminal:
    """``netfly chat`` with stdin/stdout on one pseudo-terminal and stderr on another (both ttys)."""

    def __init__(self, *args: str) -> None:
        self.out_master, out_slave = os.openpty()
        self.err_master, err_slave = os.openpty()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "netfly", "chat", *args], stdin=out_slave, stdout=out_slave, stderr=err_slave,
            env={**os.environ, "NETFLY_PROVIDER": "", "TERM": "dumb"}, close_fds=True,
        )
        os.close(out_slave)
        os.close(err_slave)
        self.out = self.err = ""

    def type(self, line: str) -> None:
        os.write(self.out_master, line.encode() + b"\r")

    async def expect(self, text: str, *, on: str = "out") -> None:
        """Wait until ``text`` has appeared on stdout (or stderr) since the start."""
        deadline = time.monotonic() + DEADLINE
        while text not in getattr(self, on):
            assert time.monotonic() < deadline, f"{text!r} never appeared; stdout={self.out!r} stderr={self.err!r}"
            self._drain()
            await asyncio.sleep(0.02)  # the upstream runs in this event loop

    def _drain(self) -> None:
        for name, fd in (("out", self.out_master), ("err", self.err_master)):
            while select.select([fd], [], [], 0)[0]:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # the child closed its side
                    break
                if not data:
                    break
                setattr(self, name, getattr(self, name) + data.decode(errors="replace"))

    async def grows(self, by: int) -> None:
        """Wait until stdout has ``by`` more characters than now."""
        deadline, target = time.monotonic() + DEADLINE, len(self.out) + by
        while len(self.out) < target:
            assert time.monotonic() < deadline, f"stdout stopped at {self.out!r}"
            self._drain()
            await asyncio.sleep(0.02)

    async def wait(self) -> int:
        deadline = time.monotonic() + DEADLINE
        while self.process.poll() is None:
            assert time.monotonic() < deadline, "netfly chat did not end"
            self._drain()
            await asyncio.sleep(0.02)
        self._drain()
        return self.process.returncode

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.out_master)
        os.close(self.err_master)


def user_turns(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


async def test_conversation_keeps_context_ctrl_c_stops_an_answer_and_save_continues(
        scripted: Any, tmp_path: Path) -> None:
    release = asyncio.Event()

    async def first(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, answer("Hello ", "Ada."))

    async def second(request: web.Request) -> web.StreamResponse:
        usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
        return await stream_bytes(request, sse(chunk(role="assistant"), chunk("You are "), chunk("Ada."),
                                                chunk(finish="stop"), chunk(usage=usage, choices=False)))

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(chunk(role="assistant"), chunk("Once upon"), done=False))
        await asyncio.wait_for(release.wait(), DEADLINE)  # only a disconnect ends it
        return response

    async def fourth(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, answer("Fresh start."))

    server = await scripted(first, second, endless, fourth)
    saved = tmp_path / "talk.json"
    terminal = Terminal("--url", server.url, "--model", "m1", "--system", "be brief")
    try:
        await terminal.expect("/help for commands", on="err")
        terminal.type("My name is Ada")
        await terminal.expect("Hello Ada.")
        await terminal.expect("TTFT", on="err")
        terminal.type("Who am I?")
        await terminal.expect("You are Ada.")
        await terminal.expect("tokens/s", on="err")  # the upstream reported usage: a real token rate
        assert user_turns(server.requests[1]["messages"]) == [
            ("system", "be brief"), ("user", "My name is Ada"), ("assistant", "Hello Ada."), ("user", "Who am I?")]

        terminal.type("Tell me a long story")
        await terminal.expect("Once upon")
        terminal.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        await terminal.expect("stopped", on="err")
        deadline = time.monotonic() + DEADLINE
        while server.disconnects < 1:  # the upstream request was cancelled, not left running
            assert time.monotonic() < deadline, "the upstream never saw the disconnect"
            await asyncio.sleep(0.02)
        assert terminal.process.poll() is None  # the session goes on

        terminal.type(f"/save {saved}")
        await terminal.expect("saved 7 messages", on="err")
        terminal.type("/new")
        await terminal.expect("new conversation", on="err")
        terminal.type("Hi again")
        await terminal.expect("Fresh start.")
        assert user_turns(server.requests[3]["messages"]) == [("system", "be brief"), ("user", "Hi again")]
        terminal.type("/exit")
        assert await terminal.wait() == 0
        assert "Traceback" not in terminal.err
    finally:
        release.set()
        terminal.close()

    messages = json.loads(saved.read_text())
    assert user_turns(messages)[-2:] == [("user", "Tell me a long story"), ("assistant", "Once upon")]


async def test_continue_a_saved_conversation_and_piped_input_stays_one_shot(scripted: Any, tmp_path: Path) -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        return await stream_bytes(request, answer("Still Ada."))

    server = await scripted(reply)
    saved = tmp_path / "talk.json"
    saved.write_text(json.dumps([{"role": "user", "content": "I am Ada"}, {"role": "assistant", "content": "Hi Ada"}]))
    terminal = Terminal("--url", server.url, "-c", str(saved))
    try:
        terminal.type("Who am I?")
        await terminal.expect("Still Ada.")
        terminal.type("/model other-model")
        await terminal.expect("model: other-model", on="err")
        os.write(terminal.out_master, b"\x04")  # Ctrl-D ends the session
        assert await terminal.wait() == 0
    finally:
        terminal.close()
    assert user_turns(server.requests[0]["messages"]) == [
        ("user", "I am Ada"), ("assistant", "Hi Ada"), ("user", "Who am I?")]

    code, out, err = await run_cli("chat", "--url", server.url, stdin=b"Hello")  # not a terminal: one answer
    assert (code, out, err) == (0, "Still Ada.\n", "")
    assert user_turns(server.requests[-1]["messages"]) == [("user", "Hello")]


async def test_a_conversation_file_that_is_not_messages_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "talk.json"
    bad.write_text('{"role": "user"}')
    code, _, err = await run_cli("chat", "--url", "http://127.0.0.1:9", "-c", str(bad), "hi")
    assert code == 2
    assert f"the conversation {bad} must be a JSON list of messages" in err
    code, _, err = await run_cli("chat", "--url", "http://127.0.0.1:9", "-c", str(tmp_path / "none.json"), "hi")
    assert code == 2
    assert "cannot read the conversation" in err


@pytest.mark.local
async def test_two_turns_with_the_real_local_model_and_ctrl_c(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="needs the [local] extra")
    saved = tmp_path / "local.json"
    terminal = Terminal("--provider", "Local", "--max-tokens", "300")
    try:
        terminal.type("Say hello.")
        await terminal.expect("attempts 1]", on="err")
        terminal.type("Write a long story about a fox.")
        await terminal.expect("Write a long story about a fox.\r\n")
        await terminal.grows(by=5)  # some of the answer has arrived
        terminal.process.send_signal(signal.SIGINT)
        await terminal.expect("stopped", on="err")
        assert terminal.err.count("attempts 1]") == 2 and "Traceback" not in terminal.err
        terminal.type(f"/save {saved}")
        await terminal.expect("saved", on="err")
        terminal.type("/exit")
        assert await terminal.wait() == 0
    finally:
        terminal.close()
    roles = [m["role"] for m in json.loads(saved.read_text())]
    assert roles == ["user", "assistant", "user", "assistant"]  # two turns; the stopped one kept
