"""Peak memory for a hostile stream: 40 MiB of ``data: x`` lines and never a blank line.

    python benchmarks/event_memory.py

Each case runs in a fresh process so its peak RSS is its own: ``decoder`` feeds the bytes to
:class:`netfly.SSEDecoder` in 64 KiB reads, ``library`` streams them from a loopback server through
``Provider.stream`` (which must fail with ``StreamDecodeError`` once the event passes
``max_event_bytes``). ``baseline`` is the same process doing nothing, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys

TOTAL = 40 << 20
READ = 64 << 10
LINE = b"data: x\n"


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_decoder() -> str:
    from netfly import SSEDecoder, StreamDecodeError

    decoder = SSEDecoder()
    piece = LINE * (READ // len(LINE))
    try:
        for _ in range(TOTAL // len(piece)):
            decoder.feed(piece)
        decoder.flush()
    except StreamDecodeError as exc:
        return f"StreamDecodeError: {exc}"
    return "no error"


async def run_library() -> str:
    from aiohttp import web

    import netfly

    async def hostile(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        piece = LINE * (READ // len(LINE))
        try:
            for _ in range(TOTAL // len(piece)):
                await response.write(piece)
            await response.write_eof()
        except ConnectionError:
            pass  # the client gave up on the oversized event: the expected outcome
        return response

    app = web.Application()
    app.router.add_post("/{tail:.*}", hostile)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    provider = netfly.OpenAICompatible.configure(url=f"http://127.0.0.1:{port}/v1", api_key="k")
    try:
        async with provider.stream("m", [{"role": "user", "content": "hi"}], max_retries=1) as stream:
            async for _ in stream:
                pass
        return "no error"
    except netfly.StreamDecodeError as exc:
        return f"StreamDecodeError: {exc}"
    finally:
        await netfly.transport.aclose()
        await runner.cleanup()


def child(case: str) -> None:
    if case == "baseline":
        import netfly  # noqa: F401  (same imports as the other cases)

        outcome = "-"
    elif case == "decoder":
        outcome = run_decoder()
    else:
        outcome = asyncio.run(run_library())
    print(f"{case:9} peak RSS {peak_mib():7.1f} MiB  {outcome}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["baseline", "decoder", "library"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        child(args.case)
        return
    print(f"{TOTAL >> 20} MiB of {LINE!r} lines, no blank line:")
    for case in ("baseline", "decoder", "library"):
        subprocess.run([sys.executable, __file__, "--case", case], check=True)


if __name__ == "__main__":
    main()
