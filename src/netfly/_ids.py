"""Unique ids for requests, answers and stream leases, without a system call each.

Such an id must be unique, not secret (nothing is looked up or authorised by it): ``secrets.token_hex``
asks the kernel for random bytes every time. A random prefix drawn once per process, followed by a
counter, gives ids of the same shape that never repeat in a process and, with 64 random bits of
prefix, not across the processes of a gateway either. A forked child draws its own prefix.
"""

from __future__ import annotations

import itertools
import os
import secrets

_prefix = ""
_counter = itertools.count()


def _start() -> None:
    global _prefix, _counter
    _prefix = secrets.token_hex(8)
    _counter = itertools.count()


_start()
if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_start)


def unique_hex() -> str:
    """32 hex digits, like ``secrets.token_hex(16)``, never the same twice."""
    return f"{_prefix}{next(_counter):016x}"
