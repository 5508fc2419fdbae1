"""Run ``netfly`` with memory probes, for benchmarks/soak.py ``--probe DIR`` (not part of the product).

    python benchmarks/gateway_probe.py DIR serve --port 8000 ...

Starts tracemalloc (``PROBE_FRAMES`` frames per allocation, default 1; ``PROBE_TRACE=0`` leaves it
off, so RSS is not inflated by tracing), then runs the ``netfly`` command. On SIGUSR1 it writes
``DIR/<name>.txt``, ``<name>`` read from ``DIR/next``: RSS, tracemalloc's total, the live asyncio
tasks, the object counts by type that changed since the first report, the largest growths by line
since the first report, glibc's heap figures (``mallinfo2``: in use, free) and RSS again after
``malloc_trim(0)`` (what glibc gives back is free heap, not live objects).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import gc
import os
import signal
import sys
import tracemalloc
from types import FrameType

_first: dict[str, object] = {}
libc = ctypes.CDLL("libc.so.6")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_figures() -> str:
    """glibc's own account: heap from brk (in use / free), and memory in separate mmaps."""
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    mib = 2**20
    return (f"malloc heap {info.arena / mib:.1f} MiB ({info.uordblks / mib:.1f} in use, "
            f"{info.fordblks / mib:.1f} free), mmapped {info.hblkhd / mib:.1f} MiB in {info.hblks} blocks")


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def type_counts() -> collections.Counter[str]:
    gc.collect()
    return collections.Counter(type(obj).__qualname__ for obj in gc.get_objects())


def live_tasks() -> int:
    try:
        return len(asyncio.all_tasks(asyncio.get_running_loop()))
    except RuntimeError:
        return -1


def report(directory: str) -> None:
    with open(os.path.join(directory, "next")) as marker:
        name = marker.read().strip()
    counts = type_counts()
    lines = [f"RSS {rss_mib():.1f} MiB", f"live asyncio tasks {live_tasks()}", f"gc objects {sum(counts.values())}"]
    snapshot = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
    if snapshot is not None:
        current, peak = tracemalloc.get_traced_memory()
        lines.append(f"tracemalloc current {current / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB")
    if not _first:
        _first.update(counts=counts, snapshot=snapshot)
    else:
        lines.append("object counts changed since the first report:")
        first_counts: collections.Counter[str] = _first["counts"]  # type: ignore[assignment]
        changes = {kind: counts[kind] - first_counts[kind] for kind in counts | first_counts}
        for kind, change in sorted(changes.items(), key=lambda item: -abs(item[1]))[:25]:
            if change:
                lines.append(f"  {change:+8d}  {kind} (now {counts[kind]})")
        if snapshot is not None and _first["snapshot"] is not None:
            lines.append("largest growths by line since the first report:")
            for stat in snapshot.compare_to(_first["snapshot"], "lineno")[:25]:  # type: ignore[arg-type]
                lines.append(f"  {stat}")
    lines.append(malloc_figures())
    libc.malloc_trim(0)
    lines.append(f"RSS after malloc_trim(0) {rss_mib():.1f} MiB; {malloc_figures()}")
    with open(os.path.join(directory, f"{name}.txt.part"), "w") as out:
        out.write("\n".join(lines) + "\n")
    os.rename(os.path.join(directory, f"{name}.txt.part"), os.path.join(directory, f"{name}.txt"))


def main() -> None:
    directory = sys.argv[1]
    os.makedirs(directory, exist_ok=True)
    if os.environ.get("PROBE_TRACE", "1") != "0":
        tracemalloc.start(int(os.environ.get("PROBE_FRAMES", "1")))

    def on_usr1(signum: int, frame: FrameType | None) -> None:
        report(directory)

    signal.signal(signal.SIGUSR1, on_usr1)
    from netfly.cli import main as netfly_main

    sys.argv = ["netfly", *sys.argv[2:]]
    sys.exit(netfly_main())


if __name__ == "__main__":
    main()
