"""``netfly serve --workers N``: N gateway processes on one port, under a small supervisor.

Each worker is an ordinary ``netfly serve`` that binds the port with ``SO_REUSEPORT``, so the
kernel spreads new connections over them; the supervisor only starts, watches and stops them.
A worker that dies is replaced; SIGTERM (or Ctrl-C) is passed to every worker, which drains its
requests for ``--shutdown-grace`` seconds; SIGHUP is passed on (each worker reloads its file).

No worker outlives its supervisor: each one's stdin is a pipe whose other end only the supervisor
holds, and the kernel closes it however the supervisor ends (SIGKILL included); at end-of-file the
worker drains and exits as on SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

logger = logging.getLogger("netfly.gateway")

WORKER_FLAG = "--worker"  # hidden: "you are one of several; bind with SO_REUSEPORT"
_POLL = 0.1
_QUICK_EXIT = 2.0  # a worker that exits this soon after its start failed to start
_QUICK_EXITS_TO_GIVE_UP = 3
_AFTER_GRACE = 5.0  # after the grace, the time workers get to exit before they are killed


def worker_argv(argv: Sequence[str]) -> list[str]:
    """The command of one worker: ``netfly`` with the same arguments, ``--workers`` replaced."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            kept.append(arg)
    return [sys.executable, "-m", "netfly", *kept, WORKER_FLAG]


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """Keeps ``count`` workers running until told to stop."""

    def __init__(self, command: list[str], count: int, grace: float) -> None:
        self.command, self.count, self.grace = command, count, grace
        self.workers: list[Worker] = []
        self._stopping = False
        self._quick_exits = 0

    def run(self) -> int:
        """Start the workers and watch them; the exit code once they are all gone."""
        previous = {signum: signal.signal(signum, self._on_signal)
                    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            self.workers = [self._spawn() for _ in range(self.count)]
            logger.info("supervising %d gateway workers (pids %s)", self.count,
                        ", ".join(str(w.process.pid) for w in self.workers))
            while not self._stopping:
                time.sleep(_POLL)
                if not self._replace_dead():
                    self._stop()
                    return 1
            self._stop()
            return 0
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _spawn(self) -> Worker:
        return Worker(subprocess.Popen(self.command, stdin=subprocess.PIPE))

    def _replace_dead(self) -> bool:
        """Start a new worker for each that exited; ``False`` when they keep failing at start."""
        for index, worker in enumerate(self.workers):
            code = worker.process.poll()
            if code is None or self._stopping:
                continue
            quick = time.monotonic() - worker.started < _QUICK_EXIT
            self._quick_exits = self._quick_exits + 1 if quick else 0
            if self._quick_exits >= _QUICK_EXITS_TO_GIVE_UP:
                logger.error("gateway workers exit as soon as they start (exit code %s); stopping", code)
                return False
            logger.warning("gateway worker %d exited (%s); starting a new one", worker.process.pid, _exit_text(code))
            _close_pipe(worker.process)
            self.workers[index] = self._spawn()
        return True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._send(signal.SIGHUP)
        else:
            self._stopping = True

    def _send(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signum)

    def _stop(self) -> None:
        """Drain: SIGTERM to every worker, which finishes its requests within the grace."""
        self._send(signal.SIGTERM)
        deadline = time.monotonic() + self.grace + _AFTER_GRACE
        for worker in (w.process for w in self.workers):
            try:
                worker.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("gateway worker %d did not stop in time; killing it", worker.pid)
                worker.kill()
                worker.wait()
            _close_pipe(worker)


def _close_pipe(process: subprocess.Popen[bytes]) -> None:
    if process.stdin is not None:
        process.stdin.close()


def watch_supervisor() -> None:
    """In a worker: drain and exit (SIGTERM to ourselves) once the supervisor's pipe closes."""

    def wait_for_eof() -> None:
        # os.read, not sys.stdin: a daemon thread blocked in a buffered reader can abort the
        # interpreter's shutdown.
        while os.read(0, 4096):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait_for_eof, name="netfly-supervisor-watch", daemon=True).start()


def _exit_text(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
