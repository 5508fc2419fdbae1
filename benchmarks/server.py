"""The benchmark's upstream: an aiohttp server streaming a pre-built OpenAI-style answer.

Run in its own process (``python benchmarks/server.py --port P``) so the client's CPU is measured
alone. Any POST is answered with the event stream of ``max_tokens`` (or ``max_completion_tokens``)
content chunks, written in the ~16 KiB slices of :func:`payload.slices`; without ``"stream": true``,
with the same answer as one ``chat.completion`` object.
"""

from __future__ import annotations

import argparse
import json

import payload
from aiohttp import web


async def stream(request: web.Request) -> web.StreamResponse:
    body = json.loads(await request.read())
    n = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
    if not body.get("stream"):
        return web.Response(body=payload.completion(n), content_type="application/json")
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    for piece in payload.slices(n):
        await response.write(piece)
    await response.write_eof()
    return response


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": payload.MODEL, "object": "model"}]})


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/{tail:.*}", models)
    app.router.add_post("/{tail:.*}", stream)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prebuild", default="", help="comma-separated N to build before serving")
    args = parser.parse_args()
    for n in filter(None, args.prebuild.split(",")):
        payload.slices(int(n))
    web.run_app(make_app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
