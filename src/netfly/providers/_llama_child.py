"""Bootstrap of the llama.cpp server child: ``python _llama_child.py -m llama_cpp.server ARGS...``.

Run as a script by :mod:`netfly.providers.llama_server`, never imported. Before handing over to
the server module it

- starts a thread that waits for end-of-file on stdin, a pipe whose other end only the parent
  holds: the kernel closes it however the parent ends (exit, crash, SIGKILL), so the server never
  outlives netfly;
- removes environment variables that ``llama_cpp.server`` settings would read (``HOST``, ``PORT``,
  ``API_KEY``, ``MODEL``, ``CONFIG_FILE`` ...), so the user's environment cannot move the port or
  demand a key the parent does not know: the command line is the whole configuration.
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys
import threading

TEMP_LOG_ENV = "NETFLY_LOCAL_TEMP_LOG"  # set by the parent when our log is its temporary file


def _exit_when_parent_is_gone(temporary_log: str | None) -> None:
    try:
        # Returns only at EOF: the parent closed the pipe, after writing STOP when it meant to,
        # or it died and the kernel closed it.
        # os.read, not sys.stdin: a daemon thread blocked inside a buffered reader aborts the
        # interpreter's shutdown when the server exits on its own.
        said = b""
        while chunk := os.read(0, 4096):
            said += chunk
        if temporary_log and not said:
            os.remove(temporary_log)  # the parent died without stopping us: nobody else will
    except OSError:
        pass
    finally:
        os._exit(0)


def _scrub_settings_environment() -> None:
    settings = importlib.import_module("llama_cpp.server.settings")  # the [local] extra; not type-checked
    names = {name.lower() for name in settings.Settings.model_fields} | {"config_file"}
    for key in list(os.environ):
        if key.lower() in names:
            del os.environ[key]


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:
        del sys.path[0]  # this script's folder: its modules must not shadow top-level names
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        sys.exit("usage: _llama_child.py -m MODULE [ARGS...]")
    watch = threading.Thread(
        target=_exit_when_parent_is_gone,
        args=(os.environ.pop(TEMP_LOG_ENV, None),),
        name="netfly-parent-watch",
        daemon=True,
    )
    watch.start()
    _scrub_settings_environment()
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
