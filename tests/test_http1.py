"""The lean HTTP/1.1 client (direct calls) against a loopback server that writes exact response bytes."""

from __future__ import annotations

import asyncio
import gzip
import zlib

import pytest

from netfly import FreeNetfly, StreamInterruptedError, Timeout, TransportError, aclose
from netfly.transport import SessionPool, open_stream

from .conftest import answer, chunk, sse

MESSAGES = [{"role": "user", "content": "hi"}]


class RawServer:
    """Answers each request with the next byte string of its script, then closes if told to."""

    def __init__(self, *script: bytes, close: bool = False) -> None:
        self.script, self.close, self.requests = list(script), close, 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:  # the client keeps its connection: the server ends it
            writer.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                writer.write(self.script[min(self.requests, len(self.script) - 1)])
                self.requests += 1
                await writer.drain()
                if self.close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


def response(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", "Content-Type: text/event-stream", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def sized(body: bytes, *headers: str) -> bytes:
    return response(body, f"Content-Length: {len(body)}", *headers)


async def complete(url: str, **options: object) -> str:
    provider = FreeNetfly.configure(url=url, retry_delay=0.01, max_retries=1)
    return await provider.create_async(None, MESSAGES, **options)


@pytest.mark.parametrize("encode", [gzip.compress, zlib.compress, lambda b: zlib.compress(b)[2:-4]],
                         ids=["gzip", "deflate", "raw-deflate"])
async def test_a_compressed_answer_is_decoded(encode: object) -> None:
    body = encode(answer("packed ", "text"))  # type: ignore[operator]
    encoding = "gzip" if body[:2] == b"\x1f\x8b" else "deflate"
    async with RawServer(sized(body, f"Content-Encoding: {encoding}")) as server:
        assert await complete(server.url) == "packed text"


async def test_interim_responses_are_skipped() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    async with RawServer(interim + sized(answer("after hints"))) as server:
        assert await complete(server.url) == "after hints"


async def test_a_body_that_ends_with_the_connection() -> None:
    async with RawServer(response(answer("until ", "close")), close=True) as server:
        assert await complete(server.url) == "until close"


async def test_a_chunked_body_on_one_kept_connection() -> None:
    body = answer("chunked")
    framed = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    async with RawServer(response(framed, "Transfer-Encoding: chunked")) as server:
        assert [await complete(server.url) for _ in range(3)] == ["chunked"] * 3


async def test_a_body_shorter_than_its_content_length_is_cut_off() -> None:
    body = sse(chunk("half"), done=False)
    async with RawServer(response(body, f"Content-Length: {len(body) + 100}"), close=True) as server:
        with pytest.raises(StreamInterruptedError, match=r"was cut off: .*Not enough data") as caught:
            await complete(server.url)
    assert caught.value.partial_text == "half"


async def test_a_close_before_the_head_is_a_closed_connection() -> None:
    async with RawServer(b"", close=True) as server:
        with pytest.raises(TransportError, match=r"closed the connection$"):
            await complete(server.url)


async def test_a_header_line_over_8190_bytes_is_refused() -> None:
    async with RawServer(response(answer("x"), "X-Big: " + "a" * 8190)) as server:
        with pytest.raises(TransportError, match=r"header field longer than 8190 bytes"):
            await complete(server.url)


async def test_an_endless_response_head_is_refused_at_64_kib() -> None:
    endless = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n" * 4000
    async with RawServer(endless) as server:
        with pytest.raises(TransportError, match=r"response head larger than 65536 bytes"):
            await complete(server.url)


async def test_small_chunks_that_arrived_together_are_handed_on_in_one_read() -> None:
    events = [sse(chunk(f"w{i} "), done=False) for i in range(40)]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"  # a chunk per event
    async with RawServer(response(framed, "Transfer-Encoding: chunked")) as server:
        opened = await open_stream(f"{server.url}/v1/chat/completions", b"{}", {}, target="raw", timeout=Timeout())
        try:
            await asyncio.sleep(0.1)  # all of it has arrived
            reads = [raw async for raw in opened]
        finally:
            opened.release()
    assert b"".join(reads) == b"".join(events)
    assert len(reads) == 1  # not one read per chunk
    await aclose()


def test_the_client_runs_on_uvloop() -> None:
    # uvloop's create_connection takes no happy-eyeballs arguments: passing them was a TypeError.
    uvloop = pytest.importorskip("uvloop")

    async def kept_connection() -> list[str]:
        async with RawServer(sized(answer("on ", "uvloop"))) as server:
            try:
                return [await complete(server.url) for _ in range(2)]
            finally:
                await aclose()

    assert uvloop.run(kept_connection()) == ["on uvloop"] * 2


def test_each_loop_gets_its_own_pool_and_a_closed_one_is_replaced() -> None:
    # The pool remembers the last loop it served: a new loop (a new asyncio.run) or aclose() must not
    # be handed the pool of another loop or the closed one.
    pool = SessionPool()

    async def pools() -> tuple[object, object, object]:
        first = await pool.http1()
        again = await pool.http1()
        await pool.aclose()
        return first, again, await pool.http1()

    first, again, after_close = asyncio.run(pools())
    other_loop, _, _ = asyncio.run(pools())
    assert first is again and after_close is not first
    assert other_loop is not first and other_loop is not after_close
