"""The least an aiohttp gateway can do: a yardstick for ``netfly serve`` in benchmarks/gateway.py.

    python benchmarks/aiohttp_relay.py --port PORT --upstream http://127.0.0.1:UPSTREAM

One aiohttp server, one pooled ``ClientSession``: each POST is sent on to the upstream with the same
path and body, and the upstream's answer comes back unread — streamed bytes written as they arrive,
a whole answer as one body. No parsing, no validation, no accounting, no errors translated, no logs.
What this costs over talking to the upstream directly is the floor of any gateway built on aiohttp
(its HTTP server and client on both sides of one process), so netfly's own share is the rest.
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

_PASSED_ON = ("content-type", "authorization")


async def relay(request: web.Request) -> web.StreamResponse:
    session: aiohttp.ClientSession = request.app["session"]
    headers = {name: value for name, value in request.headers.items() if name.lower() in _PASSED_ON}
    body = await request.read()
    async with session.post(request.app["upstream"] + request.path, data=body, headers=headers) as upstream:
        if upstream.content_type != "text/event-stream":
            return web.Response(body=await upstream.read(), status=upstream.status,
                                content_type=upstream.content_type)
        response = web.StreamResponse(status=upstream.status, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        async for data in upstream.content.iter_any():
            await response.write(data)
        await response.write_eof()
        return response


async def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app["upstream"] = upstream.rstrip("/")
    app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def close(app: web.Application) -> None:
        await app["session"].close()

    app.on_cleanup.append(close)
    app.router.add_post("/{path:.*}", relay)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    web.run_app(make_app(args.upstream), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
