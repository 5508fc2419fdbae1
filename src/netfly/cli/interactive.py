"""``netfly chat`` with no prompt on a terminal: a conversation that goes on, turn after turn.

Answers stream to stdout; each answer's figures (provider, time to first token, speed, attempts)
go to stderr. Ctrl-C stops the answer being streamed, not the session; at the prompt it clears the
line (Ctrl-D or ``/exit`` ends the session). Line editing and history (arrow keys) are readline's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..errors import ConfigurationError, NetflyError
from ..provider import Provider
from ..stream import ChatStream

with contextlib.suppress(ImportError):  # absent on some platforms: input() still works, without history
    import readline  # noqa: F401  (imported for its side effect on input())

HELP = """commands:
  /new           start a new conversation (the system message stays)
  /model NAME    use another model from the next answer on
  /system TEXT   set the system message (/system alone removes it)
  /save FILE     write the conversation as JSON messages (netfly chat -c FILE continues it)
  /help          this list
  /exit          end the session (or Ctrl-D); Ctrl-C stops the answer being streamed"""
PROMPT = "> "

Message = dict[str, Any]


@dataclass
class Session:
    """One person's conversation with one provider."""

    provider: type[Provider]
    model: str | None
    messages: list[Message] = field(default_factory=list)
    proxy: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    out: TextIO = sys.stdout
    err: TextIO = sys.stderr

    def say(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()


async def run(session: Session, read_line: Callable[[str], str] = input) -> int:
    """Read and answer turns until ``/exit`` or end of input; returns the exit code (0)."""
    session.say(f"netfly chat with {session.provider.name()}: /help for commands, Ctrl-D to leave")
    while True:
        try:
            with _interrupts_raise():
                line = read_line(PROMPT)
        except KeyboardInterrupt:
            session.err.write("\n")  # Ctrl-C at the prompt clears the line, as in a shell
            continue
        except EOFError:
            session.err.write("\n")
            return 0
        if line.startswith("/"):
            if not command(session, line.strip()):
                return 0
        elif line.strip():
            await turn(session, line)


def command(session: Session, line: str) -> bool:
    """Carry out one slash command; False when the session should end."""
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/new":
        session.messages[:] = [m for m in session.messages if m.get("role") == "system"]
        session.say("new conversation")
    elif name == "/model" and rest:
        _set_model(session, rest)
    elif name == "/system":
        set_system(session.messages, rest or None)
        session.say(f"system message set: {rest}" if rest else "system message removed")
    elif name == "/save" and rest:
        _save(session, rest)
    elif name == "/help":
        session.say(HELP)
    else:
        session.say(f"unknown command {line!r}\n{HELP}")
    return True


def _set_model(session: Session, model: str) -> None:
    try:
        session.model = session.provider.get_model(model)
    except NetflyError as exc:
        session.say(f"netfly: {exc}")
        return
    session.say(f"model: {session.model}")


def _save(session: Session, path: str) -> None:
    try:
        Path(path).expanduser().write_text(json.dumps(session.messages, ensure_ascii=False, indent=2) + "\n",
                                           encoding="utf-8")
    except OSError as exc:
        session.say(f"netfly: cannot save to {path}: {exc.strerror or exc}")
        return
    session.say(f"saved {len(session.messages)} messages to {path}")


async def turn(session: Session, text: str) -> None:
    """Send ``text`` with the conversation so far and stream the answer; Ctrl-C stops it."""
    session.messages.append({"role": "user", "content": text})
    stream = session.provider.stream(session.model, session.messages, session.proxy, **session.params)
    parts: list[str] = []
    task = asyncio.ensure_future(_print_answer(session, stream, parts))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, task.cancel)
    try:
        await asyncio.wait([task])
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    if parts:
        session.out.write("\n")
        session.out.flush()
    error = None if task.cancelled() else task.exception()
    if error is not None and not isinstance(error, NetflyError):
        raise error
    if parts:  # a stopped answer stays: the person saw it, and the next turn may refer to it
        session.messages.append({"role": "assistant", "content": "".join(parts)})
    else:
        session.messages.pop()  # no answer: the question is not kept, so it can be asked again
    if error is not None:
        session.say(f"netfly: error: {type(error).__name__}: {' '.join(str(error).split())}")
    session.say(answer_figures(stream, stopped=task.cancelled()))


async def _print_answer(session: Session, stream: ChatStream, parts: list[str]) -> None:
    async with stream:
        async for text in stream:
            parts.append(text)
            session.out.write(text)
            session.out.flush()


def answer_figures(stream: ChatStream, *, stopped: bool = False) -> str:
    """One line: who answered, how soon, how fast, in how many attempts."""
    stats = stream.stats
    figures = [f"[{stats.provider}"]
    if stopped:
        figures.append("stopped")
    ttft = stats.time_to_first_token
    figures.append(f"TTFT {ttft:.2f} s" if ttft is not None else "TTFT -")
    usage = stream.result.usage if stream.result is not None else None
    tokens = usage.get("completion_tokens") if usage else None
    streaming_time = (stats.duration or 0.0) - (ttft or 0.0)
    if ttft is not None and streaming_time > 0:
        rate, unit = (tokens, "tokens/s") if isinstance(tokens, int) else (stats.chunks, "chunks/s")
        figures.append(f"{rate / streaming_time:.1f} {unit}")
    figures.append(f"attempts {len(stats.attempts)}]")
    return " · ".join(figures)


@contextlib.contextmanager
def _interrupts_raise() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt while waiting for a line (asyncio's runner would only
    cancel the session's task, leaving ``input()`` blocked)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def set_system(messages: list[Message], text: str | None) -> None:
    """Replace the conversation's system message (first), or remove it when ``text`` is None."""
    messages[:] = [m for m in messages if m.get("role") != "system"]
    if text:
        messages.insert(0, {"role": "system", "content": text})


def load_conversation(path: str) -> list[Message]:
    """The messages saved by ``/save``; :class:`ConfigurationError` naming what is wrong."""
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"cannot read the conversation {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigurationError(f"the conversation {path} is not JSON: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(m, dict) and "role" in m for m in data):
        raise ConfigurationError(f"the conversation {path} must be a JSON list of messages with a 'role' each "
                                 "(as /save writes it)")
    return data
