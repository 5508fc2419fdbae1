"""Streaming through real HTTP and SOCKS5 proxies started by the tests; proxy passwords never leak."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import netfly
from netfly import ProxyError, TransportError
from netfly.redact import redact_url

from .conftest import answer, stream_bytes
from .proxies import HTTPProxy, SOCKS5Proxy

MESSAGES = [{"role": "user", "content": "hi"}]
PASSWORD = "pr0xy-S3cret:/@x"  # has characters that must be percent-encoded in a URL
PASSWORD_IN_URL = "pr0xy-S3cret%3A%2F%40x"
WRONG_PASSWORD = "wr0ng-Pr0xyPass"


async def _hello(request: web.Request) -> web.StreamResponse:
    return await stream_bytes(request, answer("Hello", " through", " the proxy"))


def _assert_no_secret(error: BaseException, *secrets: str) -> None:
    shown = [str(error), repr(error), "".join(traceback.format_exception(type(error), error, error.__traceback__))]
    for secret in secrets:
        for text in shown:
            assert secret not in text


async def _collect(provider: type[netfly.Provider], proxy: str, **kwargs: Any) -> str:
    return "".join([c async for c in provider.create_async_generator("", MESSAGES, proxy=proxy, **kwargs)])


# -- HTTP proxy ----------------------------------------------------------------------------------


async def test_stream_through_http_proxy_with_basic_auth(scripted: Any) -> None:
    server = await scripted(_hello)
    async with HTTPProxy("alice", PASSWORD) as proxy:
        text = await _collect(server.provider(), proxy.url("alice", PASSWORD_IN_URL))
    assert text == "Hello through the proxy"
    assert len(server.requests) == 1
    assert "Proxy-Authorization" not in server.headers[0]  # the proxy consumed it
    [record] = proxy.records
    assert (record.method, record.username, record.authorized, record.outcome) == ("POST", "alice", True, "forwarded")
    assert (record.target_host, record.target_port) == ("127.0.0.1", server.server.port)


async def test_stream_through_http_proxy_without_auth(scripted: Any) -> None:
    server = await scripted(_hello)
    async with HTTPProxy() as proxy:
        text = await _collect(server.provider(), proxy.url())
    assert text == "Hello through the proxy"
    [record] = proxy.records
    assert (record.username, record.outcome, record.target_port) == (None, "forwarded", server.server.port)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("kind", ["http", "socks5"])
async def test_proxy_on_an_ipv6_address(scripted: Any, kind: str) -> None:
    server = await scripted(_hello)
    proxy = HTTPProxy("alice", PASSWORD, host="::1") if kind == "http" else SOCKS5Proxy("alice", PASSWORD, host="::1")
    async with proxy:
        if isinstance(proxy, HTTPProxy):
            url = proxy.url("alice", PASSWORD_IN_URL)
        else:
            url = proxy.url("socks5", "alice", PASSWORD_IN_URL)
        assert "@[::1]:" in url
        assert await _collect(server.provider(), url) == "Hello through the proxy"
    assert [r.outcome for r in proxy.records] == ["forwarded" if kind == "http" else "tunnel"]
    assert str(netfly.Proxy.parse(url)) == f"{kind}://alice:***@[::1]:{proxy.port}"


async def test_pooled_connections_do_not_bypass_the_proxy(scripted: Any) -> None:
    # A direct call first leaves a pooled keep-alive connection to the server; the proxied call must
    # not reuse it.
    server = await scripted(_hello)
    provider = server.provider()
    assert "".join([c async for c in provider.create_async_generator("", MESSAGES)]) == "Hello through the proxy"
    async with HTTPProxy() as proxy:
        assert await _collect(provider, proxy.url()) == "Hello through the proxy"
    assert len(proxy.records) == 1 and len(server.requests) == 2


@pytest.mark.parametrize("credentials", ["wrong", "missing"])
async def test_http_proxy_refusing_credentials_is_a_proxy_error_not_retried(scripted: Any, credentials: str) -> None:
    server = await scripted(_hello)
    async with HTTPProxy("alice", PASSWORD) as proxy:
        url = proxy.url("alice", WRONG_PASSWORD) if credentials == "wrong" else proxy.url()
        with pytest.raises(ProxyError) as caught:
            await _collect(server.provider(), url)
    assert "407" in str(caught.value)
    assert server.requests == []  # nothing reached the server
    assert len(proxy.records) == 1  # a refused credential is not retried
    assert proxy.records[0].outcome == "auth-failed"
    _assert_no_secret(caught.value, WRONG_PASSWORD, PASSWORD)


async def test_dead_http_proxy_is_a_proxy_error(scripted: Any, free_port: int) -> None:
    server = await scripted(_hello)
    with pytest.raises(ProxyError) as caught:
        await _collect(server.provider(), f"http://alice:{PASSWORD_IN_URL}@127.0.0.1:{free_port}", max_retries=2)
    assert f"127.0.0.1:{free_port}" in str(caught.value)
    assert server.requests == []
    _assert_no_secret(caught.value, PASSWORD, PASSWORD_IN_URL)


# -- SOCKS5 proxy --------------------------------------------------------------------------------


async def test_stream_through_socks5_without_auth(scripted: Any) -> None:
    server = await scripted(_hello)
    async with SOCKS5Proxy() as proxy:
        text = await _collect(server.provider(), proxy.url("socks5"))
    assert text == "Hello through the proxy"
    [record] = proxy.records
    assert (record.address_type, record.target_host, record.target_port) == ("ipv4", "127.0.0.1", server.server.port)
    assert record.outcome == "tunnel"


async def test_stream_through_socks5_with_username_and_password(scripted: Any) -> None:
    server = await scripted(_hello)
    async with SOCKS5Proxy("bob", PASSWORD) as proxy:
        text = await _collect(server.provider(), proxy.url("socks5", "bob", PASSWORD_IN_URL))
    assert text == "Hello through the proxy"
    [record] = proxy.records
    assert (record.username, record.authorized, record.outcome) == ("bob", True, "tunnel")


@pytest.mark.parametrize(("scheme", "address_type"), [("socks5h", "domain"), ("socks5", "ip")])
async def test_socks5h_sends_the_host_name_and_socks5_the_resolved_address(
    scripted: Any, scheme: str, address_type: str
) -> None:
    server = await scripted(_hello)

    class ByName(netfly.FreeNetfly):
        url = f"http://localhost:{server.server.port}"
        retry_delay = 0.01

    async with SOCKS5Proxy() as proxy:
        assert await _collect(ByName, proxy.url(scheme)) == "Hello through the proxy"
    [record] = proxy.records
    if address_type == "domain":
        assert (record.address_type, record.target_host) == ("domain", "localhost")
    else:
        assert record.address_type in ("ipv4", "ipv6")
        assert record.target_host in ("127.0.0.1", "::1")
    assert record.target_port == server.server.port


async def test_each_socks_proxy_gets_its_own_connections(scripted: Any) -> None:
    # SOCKS needs a connector per proxy: a second proxy (or the same one with other credentials)
    # must not ride on the first one's pooled session.
    server = await scripted(_hello)
    provider = server.provider()
    async with SOCKS5Proxy() as first, SOCKS5Proxy("bob", PASSWORD) as second:
        assert await _collect(provider, first.url("socks5")) == "Hello through the proxy"
        assert await _collect(provider, second.url("socks5", "bob", PASSWORD_IN_URL)) == "Hello through the proxy"
        assert await _collect(provider, first.url("socks5")) == "Hello through the proxy"
        with pytest.raises(ProxyError):
            await _collect(provider, second.url("socks5", "bob", WRONG_PASSWORD))
    assert [r.outcome for r in first.records] == ["tunnel"]  # its pooled connection was reused
    assert [r.outcome for r in second.records] == ["tunnel", "auth-failed"]
    assert len(server.requests) == 3


async def test_socks5_wrong_password_is_a_proxy_error_not_retried(scripted: Any) -> None:
    server = await scripted(_hello)
    async with SOCKS5Proxy("bob", PASSWORD) as proxy:
        with pytest.raises(ProxyError) as caught:
            await _collect(server.provider(), proxy.url("socks5", "bob", WRONG_PASSWORD))
    assert server.requests == []
    assert [r.outcome for r in proxy.records] == ["auth-failed"]
    _assert_no_secret(caught.value, WRONG_PASSWORD, PASSWORD)


async def test_socks5_proxy_needing_auth_given_none_is_a_proxy_error(scripted: Any) -> None:
    server = await scripted(_hello)
    async with SOCKS5Proxy("bob", PASSWORD) as proxy:
        with pytest.raises(ProxyError):
            await _collect(server.provider(), proxy.url("socks5"), max_retries=1)
    assert [r.outcome for r in proxy.records] == ["no-acceptable-method"]


@pytest.mark.parametrize("scheme", ["socks5", "socks5h"])
async def test_dead_socks_proxy_is_a_proxy_error(scripted: Any, free_port: int, scheme: str) -> None:
    server = await scripted(_hello)
    with pytest.raises(ProxyError) as caught:
        await _collect(server.provider(), f"{scheme}://bob:{PASSWORD_IN_URL}@127.0.0.1:{free_port}", max_retries=2)
    assert isinstance(caught.value, TransportError)
    assert server.requests == []
    _assert_no_secret(caught.value, PASSWORD, PASSWORD_IN_URL)


async def test_socks_proxy_that_cannot_reach_the_target_is_a_proxy_error(free_port: int) -> None:
    class Nowhere(netfly.FreeNetfly):
        url = f"http://127.0.0.1:{free_port}"
        retry_delay = 0.01

    async with SOCKS5Proxy("bob", PASSWORD) as proxy:
        with pytest.raises(ProxyError) as caught:
            await _collect(Nowhere, proxy.url("socks5", "bob", PASSWORD_IN_URL), max_retries=2)
    assert [r.outcome for r in proxy.records] == ["connect-failed"] * 2  # a refused target may come back
    _assert_no_secret(caught.value, PASSWORD, PASSWORD_IN_URL)


# -- proxy URLs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "scheme", "port"),
    [
        (f"https://carol:{PASSWORD_IN_URL}@proxy.example:8443", "https", 8443),
        (f"https://carol:{PASSWORD_IN_URL}@proxy.example", "https", 443),
        (f"http://carol:{PASSWORD_IN_URL}@proxy.example", "http", 80),
        (f"socks5h://carol:{PASSWORD_IN_URL}@proxy.example", "socks5h", 1080),
    ],
)
def test_proxy_parse_accepts_and_redacts(url: str, scheme: str, port: int) -> None:
    proxy = netfly.Proxy.parse(url)
    assert (proxy.scheme, proxy.host, proxy.port, proxy.username, proxy.password) == (
        scheme, "proxy.example", port, "carol", PASSWORD,
    )
    for shown in (str(proxy), repr(proxy), proxy.url_without_credentials, redact_url(url), f"{proxy}", f"{proxy!r}"):
        assert PASSWORD not in shown and PASSWORD_IN_URL not in shown
    assert str(proxy) == f"{scheme}://carol:***@proxy.example:{port}"
    assert redact_url(url) == url.replace(PASSWORD_IN_URL, "***")


@pytest.mark.parametrize("url", [f"ftp://carol:{PASSWORD_IN_URL}@proxy.example:21", f"http://carol:{PASSWORD_IN_URL}@"])
def test_bad_proxy_url_is_a_configuration_error_without_the_password(url: str) -> None:
    with pytest.raises(netfly.ConfigurationError) as caught:
        netfly.FreeNetfly.build_request("", MESSAGES, proxy=url)
    _assert_no_secret(caught.value, PASSWORD, PASSWORD_IN_URL)


# -- TLS: CONNECT tunnels and an https:// proxy (needs the openssl command for a test certificate) --


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


def _server_context(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_files)
    return context


# aiohttp builds its verifying SSL context at import time, so the test CA is trusted through
# SSL_CERT_FILE in a child process rather than by changing the client in this one.
_CLIENT = textwrap.dedent(
    """
    import asyncio, sys, traceback
    import netfly

    Target = netfly.OpenAICompatible.configure(url=sys.argv[1], retry_delay=0.01, max_retries=2)

    async def main() -> None:
        try:
            async for chunk in Target.create_async_generator("", [{"role": "user", "content": "hi"}],
                                                              proxy=sys.argv[2]):
                print(chunk, end="")
        except netfly.NetflyError as exc:
            print(type(exc).__name__)
            print("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))

    asyncio.run(main())
    """
)


async def _run_client(target: str, proxy: str, cert: Path) -> tuple[str, str]:
    env = {**os.environ, "SSL_CERT_FILE": str(cert)}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CLIENT, target, proxy,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    out, err = await asyncio.wait_for(child.communicate(), 60)
    return out.decode(), err.decode()


@pytest.fixture
async def tls_server(aiohttp_server: Any, tls_files: tuple[Path, Path]) -> Any:
    seen: list[dict[str, str]] = []

    async def hello(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        return await _hello(request)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", hello)
    server = await aiohttp_server(app, ssl=_server_context(tls_files))
    server.seen_headers = seen
    return server


async def test_https_target_through_http_proxy_uses_an_authenticated_connect_tunnel(
    tls_server: Any, tls_files: tuple[Path, Path]
) -> None:
    async with HTTPProxy("alice", PASSWORD) as proxy:
        out, err = await _run_client(
            f"https://localhost:{tls_server.port}", proxy.url("alice", PASSWORD_IN_URL), tls_files[0]
        )
    assert (out, err) == ("Hello through the proxy", "")
    [record] = proxy.records
    assert (record.method, record.target_host, record.target_port) == ("CONNECT", "localhost", tls_server.port)
    assert (record.username, record.outcome) == ("alice", "tunnel")
    [headers] = tls_server.seen_headers
    assert "Proxy-Authorization" not in headers  # the proxy password stays outside the tunnel


async def test_connect_tunnel_refused_for_wrong_credentials(
    tls_server: Any, tls_files: tuple[Path, Path]
) -> None:
    async with HTTPProxy("alice", PASSWORD) as proxy:
        out, err = await _run_client(
            f"https://localhost:{tls_server.port}", proxy.url("alice", WRONG_PASSWORD), tls_files[0]
        )
    assert out.startswith("ProxyError\n") and "407" in out, out
    assert err == ""
    assert [r.outcome for r in proxy.records] == ["auth-failed"]
    assert WRONG_PASSWORD not in out and PASSWORD not in out


async def test_stream_through_an_https_proxy(
    scripted: Any, tls_files: tuple[Path, Path]
) -> None:
    server = await scripted(_hello)
    async with HTTPProxy("alice", PASSWORD, ssl_context=_server_context(tls_files)) as proxy:
        proxy_url = proxy.url("alice", PASSWORD_IN_URL).replace("127.0.0.1", "localhost")
        assert proxy_url.startswith("https://")
        out, err = await _run_client(server.url, proxy_url, tls_files[0])
    assert (out, err) == ("Hello through the proxy", "")
    [record] = proxy.records
    assert (record.method, record.username, record.outcome) == ("POST", "alice", "forwarded")
    assert len(server.requests) == 1
