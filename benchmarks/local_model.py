"""The local model's speed through netfly: start-up, first token, tokens/s (median of a few runs).

    python benchmarks/local_model.py [--runs 5] [--max-tokens 128]

Each run starts a fresh llama.cpp child (so no prompt cache carries over) and times how long it
takes to answer, then streams two answers at temperature 0: the first request after start-up (its
first token pays for llama.cpp's first-use set-up) and a second one with another prompt (a warm
engine, nothing of the prompt cached). Each gives the wait for its first token; the second also
the rate after it (llama-cpp-python sends one token per chunk). The first line names the CPU
features the installed llama.cpp build uses, so a native build and a portable one can be told
apart. A child that crashes is reported (that is what a native build does on some CPUs) and the
run ends with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass

from netfly import LocalServerError, StreamInterruptedError
from netfly.providers.llama_server import default_threads
from netfly.providers.local import Local
from netfly.stream import StreamStats

FIRST = [{"role": "user", "content": "Write a short poem about nature."}]
PROMPT = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]


@dataclass
class Run:
    startup: float
    cold_first_token: float
    first_token: float
    tokens: int
    tokens_per_second: float


def build_features() -> str:
    """The CPU features llama.cpp was compiled to use (``llama_print_system_info``)."""
    import llama_cpp  # the [local] extra; imported here only to describe the build

    info = llama_cpp.llama_print_system_info().decode()
    return " ".join(part.strip() for part in info.split("|") if part.strip().endswith("= 1"))


async def one_run(max_tokens: int) -> Run:
    await Local.aclose()  # a fresh child: start-up measured, no cached prompt
    started = time.monotonic()
    await Local.start()
    startup = time.monotonic() - started
    cold = await answer(FIRST, 8)
    stats = await answer(PROMPT, max_tokens)
    assert cold.time_to_first_token is not None and stats.time_to_first_token is not None
    assert stats.duration is not None
    generating = stats.duration - stats.time_to_first_token
    return Run(startup, cold.time_to_first_token, stats.time_to_first_token, stats.chunks,
               (stats.chunks - 1) / generating)


async def answer(messages: list[dict[str, str]], max_tokens: int) -> StreamStats:
    async with Local.stream(None, messages, temperature=0, max_tokens=max_tokens) as stream:
        async for _ in stream:
            pass
    return stream.stats


def median(runs: list[Run], field: str) -> float:
    return float(statistics.median(getattr(run, field) for run in runs))


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    print(f"llama.cpp build: {build_features()}")
    print(f"python {sys.version.split()[0]}, model {Local.get_model(None)}, threads {default_threads()}")
    runs: list[Run] = []
    try:
        for number in range(1, args.runs + 1):
            run = await one_run(args.max_tokens)
            runs.append(run)
            print(f"run {number}: start-up {run.startup:.2f} s, first token {run.cold_first_token * 1000:.0f} ms "
                  f"(first request), {run.first_token * 1000:.0f} ms (warm), "
                  f"{run.tokens} tokens at {run.tokens_per_second:.1f} tokens/s")
    except (LocalServerError, StreamInterruptedError) as error:
        print(f"the local model failed: {type(error).__name__}: {error}")
        return 1
    finally:
        await Local.aclose()
    print(f"median of {len(runs)}: start-up {median(runs, 'startup'):.2f} s, "
          f"first token {median(runs, 'cold_first_token') * 1000:.0f} ms (first request), "
          f"{median(runs, 'first_token') * 1000:.0f} ms (warm), "
          f"{median(runs, 'tokens_per_second'):.1f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
