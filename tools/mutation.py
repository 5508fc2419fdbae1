"""Mutation testing of the pure modules, fast: mutmut 3.8 generates the mutants, this runs them.

mutmut's own runner slows to about one mutant a second on this suite (and its forking runner can
deadlock), so each of ``--jobs`` worker processes imports pytest and the tests once and then runs
``pytest.main`` in-process per mutant with ``MUTANT_UNDER_TEST`` set (mutmut's trampolines read it
at call time). Only the module's own fast test files run, stopping at the first failure. A mutant
whose run exceeds the timeout counts as killed (it hangs) and its worker is replaced.

    python tools/mutation.py                  # all six modules; results in mutants/results.json
    python tools/mutation.py --module sse     # one module; already-run mutants are skipped
    python tools/mutation.py --survivors      # run again only the mutants that survived last time
    python tools/mutation.py --fresh          # regenerate mutants and forget earlier results

Run from the repository root with mutmut installed (``pip install mutmut==3.8.1``).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

PURE = ["tests/test_pure_edges.py", "tests/test_mutation_survivors.py"]
TESTS_BY_MODULE = {
    "sse": ["tests/test_sse.py", *PURE],
    "chunks": ["tests/test_chunks.py", "tests/test_events.py", *PURE],
    "events": ["tests/test_events.py", "tests/test_chunks.py", *PURE],
    "retry": ["tests/test_retry.py", *PURE],
    "messages": PURE,
    "redact": ["tests/test_redaction.py", "tests/test_leaks.py", *PURE],
}
MUTANTS = Path("mutants")
RESULTS = MUTANTS / "results.json"
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-m", "not local"]


def generate() -> dict[str, list[str]]:
    """Let mutmut write ``mutants/``; return the mutant names of each module."""
    from mutmut.__main__ import create_mutants
    from mutmut.configuration import config
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir

    config().only_mutate[:] = [f"src/netfly/{name}.py" for name in TESTS_BY_MODULE]
    MUTANTS.mkdir(exist_ok=True)
    copy_src_dir()
    copy_also_copy_files()
    create_mutants(2)
    names: dict[str, list[str]] = {}
    for module in TESTS_BY_MODULE:
        data = SourceFileMutationData(path=Path(f"src/netfly/{module}.py"))
        data.load()
        names[module] = sorted(data.exit_code_by_key)
    return names


def worker(files: list[str]) -> None:
    """Read mutant names on stdin; answer each with pytest's exit code on the original stdout."""
    answer = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    import pytest

    for line in sys.stdin:
        os.environ["MUTANT_UNDER_TEST"] = line.strip()
        code = pytest.main([*PYTEST_ARGS, *files])
        answer.write(f"{int(code)}\n")
        answer.flush()


class Worker:
    """One ``worker`` child inside ``mutants/``, importing the mutated sources."""

    def __init__(self, files: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str((MUTANTS / "src").absolute()), "MUTANT_UNDER_TEST": ""}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).absolute()), "--worker", *files],
            cwd=MUTANTS, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.started = 0.0

    def start(self, mutant: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(mutant + "\n")
        self.proc.stdin.flush()
        self.started = time.monotonic()

    def answer(self, timeout: float) -> str | None:
        """``killed``/``survived``/``timeout``, or None while still running."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 0.05)
        if ready:
            line = self.proc.stdout.readline()
            return "survived" if line.strip() == "0" else "killed"
        if time.monotonic() - self.started > timeout:
            self.proc.kill()
            self.proc.wait()
            return "timeout"
        return None


def run_module(module: str, mutants: list[str], results: dict[str, str], jobs: int, timeout: float) -> None:
    files = TESTS_BY_MODULE[module]
    pending = [m for m in mutants if m not in results]
    workers: dict[int, Worker] = {i: Worker(files) for i in range(min(jobs, len(pending)))}
    running: dict[int, str] = {}
    while pending or running:
        for slot, w in workers.items():
            if slot not in running and pending:
                running[slot] = pending.pop()
                w.start(running[slot])
        for slot in list(running):
            outcome = workers[slot].answer(timeout)
            if outcome is not None:
                results[running.pop(slot)] = outcome
                if outcome == "timeout":
                    workers[slot] = Worker(files)
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True))
    for w in workers.values():
        w.proc.kill()
        w.proc.wait()


def check_clean(module: str) -> None:
    """The tests must pass with no mutant and fail under mutmut's forced-fail mutant."""
    env = {**os.environ, "PYTHONPATH": str((MUTANTS / "src").absolute())}
    for mutant, want in (("", 0), ("fail", 1)):
        code = subprocess.run([sys.executable, "-m", "pytest", *PYTEST_ARGS, *TESTS_BY_MODULE[module]],
                              cwd=MUTANTS, env={**env, "MUTANT_UNDER_TEST": mutant},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        if (code == 0) != (want == 0):
            sys.exit(f"{module}: tests exit {code} with MUTANT_UNDER_TEST={mutant!r}; fix the setup first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--module", action="append", choices=sorted(TESTS_BY_MODULE))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per mutant")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--survivors", action="store_true")
    args = parser.parse_args()
    if args.fresh and MUTANTS.exists():
        shutil.rmtree(MUTANTS)
    names = generate()
    results: dict[str, str] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    modules = args.module or list(TESTS_BY_MODULE)
    if args.survivors:
        again = {name for module in modules for name in names[module] if results.get(name) == "survived"}
        results = {name: outcome for name, outcome in results.items() if name not in again}
    for module in modules:
        check_clean(module)
        started = time.monotonic()
        run_module(module, names[module], results, args.jobs, args.timeout)
        counts = Counter(results[m] for m in names[module])
        killed = counts["killed"] + counts["timeout"]
        print(f"{module}: {len(names[module])} mutants, {killed} killed ({counts['timeout']} by timeout), "
              f"{counts['survived']} survived  [{time.monotonic() - started:.0f} s]", flush=True)
        for mutant in sorted(m for m in names[module] if results[m] == "survived"):
            print(f"  survived: {mutant}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        main()
