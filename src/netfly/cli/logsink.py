"""Where the command's log lines go: stderr, one write per turn of the event loop.

A gateway logs a line per request; a flush per line is a system call per request (~12 % of the
gateway's CPU for a short non-streamed request). Lines are kept in a buffer and written once the
loop has run the callbacks at hand: every line of one turn in one write, none held longer than that
turn. Outside a running loop (start-up, shutdown, another thread) each line is written at once.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys


class LoopFlushedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that flushes once per turn of the running event loop instead of per record."""

    def __init__(self, stream: io.TextIOBase) -> None:
        super().__init__(stream)
        self._flush_due = False

    def flush(self) -> None:  # StreamHandler.emit calls this after every record
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            super().flush()
            return
        if not self._flush_due:
            self._flush_due = True
            loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self.acquire()
        try:
            self._flush_due = False
            super().flush()
        finally:
            self.release()

    def close(self) -> None:
        super().flush()  # what is buffered goes out even when the loop that would flush it is gone
        super().close()


_streams: dict[int, io.TextIOBase] = {}  # one buffer per file: two handlers' lines never interleave


def stderr_handler() -> logging.Handler:
    """A handler writing to this process's stderr through a buffer of its own (``sys.stderr`` itself
    flushes every line)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stderr (a test's capture): use it as is
        return logging.StreamHandler(sys.stderr)
    if fd not in _streams:
        _streams[fd] = open(fd, "w", buffering=1 << 16, encoding=sys.stderr.encoding or "utf-8",
                            errors="backslashreplace", closefd=False)
    return LoopFlushedHandler(_streams[fd])
