"""Ids of requests and answers: unique within a process, across processes and after a fork."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from netfly import _ids

_HEX32 = re.compile(r"[0-9a-f]{32}")


def test_ids_are_32_hex_digits_and_never_repeat() -> None:
    ids = [_ids.unique_hex() for _ in range(100_000)]
    assert all(_HEX32.fullmatch(i) for i in ids[:100] + ids[-100:])
    assert len(set(ids)) == len(ids)


def test_each_process_draws_its_own_prefix() -> None:
    code = "from netfly import _ids; print(_ids.unique_hex())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    firsts = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             check=True).stdout.strip() for _ in range(3)}
    assert len(firsts) == 3 and all(_HEX32.fullmatch(i) for i in firsts)


# Python 3.12+ warns that forking a multi-threaded process (pytest's, here) may deadlock the child:
# this child only draws an id and writes it to a pipe.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent
        os.write(writer, _ids.unique_hex().encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(pid, 0)
    child_id = os.read(reader, 64).decode()
    os.close(reader)
    parent_id = _ids.unique_hex()
    assert _HEX32.fullmatch(child_id) and child_id[:16] != parent_id[:16]
