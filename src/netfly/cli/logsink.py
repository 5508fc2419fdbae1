"""Where the command's log lines go: stderr, in one write per turn of the event loop.

A gateway logs a line per request; a write per line is a system call per request. Lines are kept and
written once the loop has run the callbacks at hand: the lines of one turn together, none held longer
than that turn. Outside a running loop (start-up, shutdown, another thread) a line is written at once.

Each write holds whole lines and at most ``PIPE_BUF`` bytes where it can: on a pipe shared by several
processes (``netfly serve --workers``, a container's log), such writes never interleave.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import sys

_ATOMIC = getattr(select, "PIPE_BUF", 512)  # POSIX guarantees at least 512


class LoopFlushedHandler(logging.Handler):
    """Formats records as lines and writes them to a file descriptor once per turn of the running loop."""

    def __init__(self, fd: int, encoding: str) -> None:
        super().__init__()
        self.fd = fd
        self.encoding = encoding
        self._lines: list[bytes] = []
        self._flush_due = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode(self.encoding, "backslashreplace")
        except Exception:
            self.handleError(record)
            return
        self._lines.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if not self._flush_due:
            self._flush_due = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            lines, self._lines, self._flush_due = self._lines, [], False
            for piece in _pieces(lines):
                _write_all(self.fd, piece)
        except OSError:
            pass  # stderr is gone (a closed pipe): there is nowhere left to report it
        finally:
            self.release()

    def close(self) -> None:
        self.flush()  # what is kept goes out even when the loop that would write it is gone
        super().close()


def _pieces(lines: list[bytes]) -> list[bytes]:
    """``lines`` joined into as few pieces as fit ``PIPE_BUF`` each (a longer line is a piece alone)."""
    pieces: list[bytes] = []
    start, size = 0, 0
    for end, line in enumerate(lines):
        if size + len(line) > _ATOMIC and end > start:
            pieces.append(b"".join(lines[start:end]))
            start, size = end, 0
        size += len(line)
    if start < len(lines):
        pieces.append(b"".join(lines[start:]))
    return pieces


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def stderr_handler() -> logging.Handler:
    """A handler writing to this process's stderr (``sys.stderr`` itself writes every line at once)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stderr (a test's capture): use it as is
        return logging.StreamHandler(sys.stderr)
    sys.stderr.flush()  # what was printed before goes first
    return LoopFlushedHandler(fd, sys.stderr.encoding or "utf-8")
