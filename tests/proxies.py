"""Small real proxy servers for the tests: an HTTP proxy and a SOCKS5 proxy on 127.0.0.1.

Both are asyncio stream servers on ephemeral ports, used as async context managers, and both record
what they did so a test can assert that traffic really went through them. Records keep the
username and whether the password matched, never the password itself (test output stays clean).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import ssl
import struct
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit


@dataclass
class ProxyRecord:
    """One client connection as the proxy saw it."""

    method: str  # "CONNECT", the HTTP method of an absolute-form request, or "SOCKS5"
    target_host: str = ""  # as the client sent it: a name for socks5h, an IP literal for socks5
    target_port: int = 0
    address_type: str = ""  # SOCKS5 only: "ipv4", "domain" or "ipv6"
    username: str | None = None
    authorized: bool = False  # credentials (if any were required) matched
    outcome: str = ""  # "tunnel", "forwarded", "auth-failed", "no-acceptable-method", "connect-failed"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


async def _open_upstream(
    record: ProxyRecord, writer: asyncio.StreamWriter
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """Connect to the record's target; on failure answer the client 502 and return ``None``."""
    try:
        return await asyncio.open_connection(record.target_host, record.target_port)
    except OSError:
        record.outcome = "connect-failed"
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        return None


async def _splice(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    upstream_reader: asyncio.StreamReader,
    upstream_writer: asyncio.StreamWriter,
) -> None:
    """Copy bytes both ways; when either side is done (HTTP has no useful half-close), close both."""
    directions = {
        asyncio.ensure_future(_pipe(client_reader, upstream_writer)),
        asyncio.ensure_future(_pipe(upstream_reader, client_writer)),
    }
    try:
        await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in directions:
            task.cancel()
        await asyncio.gather(*directions, return_exceptions=True)
        for writer in (upstream_writer, client_writer):
            writer.close()
        for writer in (upstream_writer, client_writer):
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


class _ProxyServer:
    """Shared start/stop: an asyncio server whose connection handlers are tracked and cancelled on exit."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        self.records: list[ProxyRecord] = []
        self.host = host
        self.port = 0
        self._ssl = ssl_context
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> _ProxyServer:
        self._server = await asyncio.start_server(self._accept, self.host, 0, ssl=self._ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handle(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
                await writer.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class HTTPProxy(_ProxyServer):
    """An HTTP proxy: absolute-form requests (``POST http://host:port/path``) and ``CONNECT`` tunnels.

    With ``username``/``password`` set, a request without matching Basic ``Proxy-Authorization`` gets
    ``407``. Pass ``ssl_context`` to serve the proxy itself over TLS (an ``https://`` proxy).
    """

    def __init__(
        self,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(ssl_context, host)
        self.username = username
        self.password = password

    async def __aenter__(self) -> HTTPProxy:
        await super().__aenter__()
        return self

    def url(self, username: str | None = None, password: str | None = None) -> str:
        scheme = "https" if self._ssl is not None else "http"
        auth = f"{username}:{password}@" if username is not None else ""
        return f"{scheme}://{auth}{self.netloc}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, version = request_line.split(" ", 2)
        headers = [line for line in header_lines if line]
        record = ProxyRecord(method=method)
        self.records.append(record)

        record.username, record.authorized = self._check_auth(headers)
        if not record.authorized:
            record.outcome = "auth-failed"
            writer.write(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                b'Proxy-Authenticate: Basic realm="netfly-tests"\r\n'
                b"Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
            return

        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            record.target_host, record.target_port = host.strip("[]"), int(port)
            upstream = await _open_upstream(record, writer)
            if upstream is None:
                return
            up_reader, up_writer = upstream
            record.outcome = "tunnel"
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await _splice(reader, writer, up_reader, up_writer)
            return

        # Absolute-form: rewrite to origin-form for the target, drop hop-by-hop proxy headers and ask
        # for Connection: close so one client connection carries exactly one forwarded request.
        url = urlsplit(target)
        record.target_host, record.target_port = url.hostname or "", url.port or 80
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        kept = [
            h for h in headers
            if h.split(":", 1)[0].strip().lower() not in ("proxy-authorization", "proxy-connection", "connection")
        ]
        forwarded = "\r\n".join([f"{method} {path} {version}", *kept, "Connection: close", "", ""])
        upstream = await _open_upstream(record, writer)
        if upstream is None:
            return
        up_reader, up_writer = upstream
        record.outcome = "forwarded"
        up_writer.write(forwarded.encode("latin-1"))
        await up_writer.drain()
        await _splice(reader, writer, up_reader, up_writer)

    def _check_auth(self, headers: list[str]) -> tuple[str | None, bool]:
        """(username sent, whether the credentials are acceptable)."""
        sent: str | None = None
        for line in headers:
            name, _, value = line.partition(":")
            if name.strip().lower() == "proxy-authorization":
                sent = value.strip()
        if sent is None:
            return None, self.username is None
        scheme, _, encoded = sent.partition(" ")
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            return None, False
        if scheme.lower() != "basic":
            return None, False
        ok = self.username is None or (user == self.username and password == self.password)
        return user, ok


class SOCKS5Proxy(_ProxyServer):
    """A SOCKS5 proxy (RFC 1928, with RFC 1929 username/password auth when ``username`` is set).

    Supports the CONNECT command with IPv4, IPv6 and domain-name addresses. Each record says which
    address type and host the client asked for, so ``socks5`` (client resolves, sends an IP) and
    ``socks5h`` (client sends the name) can be told apart.
    """

    def __init__(self, username: str | None = None, password: str | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(host=host)
        self.username = username
        self.password = password

    async def __aenter__(self) -> SOCKS5Proxy:
        await super().__aenter__()
        return self

    def url(self, scheme: str = "socks5", username: str | None = None, password: str | None = None) -> str:
        auth = f"{username}:{password}@" if username is not None else ""
        return f"{scheme}://{auth}{self.netloc}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record = ProxyRecord(method="SOCKS5")
        self.records.append(record)
        version, n_methods = await reader.readexactly(2)
        if version != 5:
            record.outcome = "bad-version"
            return
        methods = await reader.readexactly(n_methods)
        wanted = 0x02 if self.username is not None else 0x00
        if wanted not in methods:
            record.outcome = "no-acceptable-method"
            writer.write(b"\x05\xff")
            await writer.drain()
            return
        writer.write(bytes([5, wanted]))
        await writer.drain()

        if wanted == 0x02:
            _subversion, user_len = await reader.readexactly(2)
            user = (await reader.readexactly(user_len)).decode()
            (password_len,) = await reader.readexactly(1)
            password = (await reader.readexactly(password_len)).decode()
            record.username = user
            if user != self.username or password != self.password:
                record.outcome = "auth-failed"
                writer.write(b"\x01\x01")
                await writer.drain()
                return
            writer.write(b"\x01\x00")
            await writer.drain()
        record.authorized = True

        _version, command, _reserved, address_type = await reader.readexactly(4)
        if address_type == 0x01:
            record.address_type = "ipv4"
            record.target_host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
        elif address_type == 0x04:
            record.address_type = "ipv6"
            record.target_host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
        elif address_type == 0x03:
            (length,) = await reader.readexactly(1)
            record.address_type = "domain"
            record.target_host = (await reader.readexactly(length)).decode()
        else:
            record.outcome = "bad-address-type"
            writer.write(_socks_reply(0x08))
            await writer.drain()
            return
        (record.target_port,) = struct.unpack("!H", await reader.readexactly(2))
        if command != 0x01:
            record.outcome = "unsupported-command"
            writer.write(_socks_reply(0x07))
            await writer.drain()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(record.target_host, record.target_port)
        except OSError:
            record.outcome = "connect-failed"
            writer.write(_socks_reply(0x05))  # connection refused
            await writer.drain()
            return
        record.outcome = "tunnel"
        writer.write(_socks_reply(0x00))
        await writer.drain()
        await _splice(reader, writer, up_reader, up_writer)


def _socks_reply(status: int) -> bytes:
    # Bound address 0.0.0.0:0: clients do not use it for CONNECT.
    return bytes([5, status, 0, 1, 0, 0, 0, 0, 0, 0])
