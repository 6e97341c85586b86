"""`cliplens serve --http` as a real subprocess on loopback: Host/Origin checks, body limit,
bearer token, and the SDK client over streamable HTTP."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from cliplens.server.app import build_server
from cliplens.server.config import Settings
from cliplens.server.http import ENV_TOKEN, MAX_BODY_BYTES, HttpConfigError, build_http_app, security_settings

from .conftest import make_image, structured
from .test_stdio_e2e import PROTOCOL_VERSION, TIMEOUT, TOOLS, cliplens_command, finish, isolated_env, start_cli

TOKEN = "t0ken-" + "x" * 26  # 32 characters
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": PROTOCOL_VERSION,
        "capabilities": {},
        "clientInfo": {"name": "cliplens-tests", "version": "0"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@dataclass
class HttpServer:
    proc: subprocess.Popen[str]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(tmp: Path, model: Path, allow: Path, name: str, *extra: str) -> HttpServer:
    port = free_port()
    log = tmp / f"{name}.log"
    args = ["serve", "--http", "--port", str(port), "--model", str(model), "--db", str(tmp / f"db-{name}")]
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [*cliplens_command(), *args, "--allow", str(allow), "--device", "cpu", *extra],
            env=isolated_env(tmp),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return HttpServer(proc, port, log)


def wait_until_listening(server: HttpServer) -> None:
    # uvicorn runs the lifespan (model load, store lock) before it binds, so a listening port
    # means a ready engine.
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited with {server.proc.returncode}:\n{server.log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=1):
            return
        time.sleep(0.1)
    raise AssertionError(f"port {server.port} did not open in {TIMEOUT}s:\n{server.log.read_text()}")


def stop(server: HttpServer) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def http_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("http-photos")
    for colour, name in (("red", "red.png"), ("green", "green.jpg"), ("blue", "blue.png"), ("yellow", "yellow.png")):
        make_image(root / name, colour)
    return root


@pytest.fixture(scope="module")
def servers(
    tiny_clip: Path, http_photos: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[HttpServer, HttpServer]]:
    """An open server and a token-protected one, started together to share the start-up time."""
    tmp = tmp_path_factory.mktemp("http")
    plain = start_server(tmp, tiny_clip, http_photos, "plain")
    guarded = start_server(tmp, tiny_clip, http_photos, "token", "--token", TOKEN)
    try:
        wait_until_listening(plain)
        wait_until_listening(guarded)
        yield plain, guarded
    finally:
        stop(plain)
        stop(guarded)


@pytest.fixture
def plain(servers: tuple[HttpServer, HttpServer]) -> HttpServer:
    return servers[0]


@pytest.fixture
def guarded(servers: tuple[HttpServer, HttpServer]) -> HttpServer:
    return servers[1]


def post(server: HttpServer, *, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
    return httpx.post(server.url, headers={**MCP_HEADERS, **(headers or {})}, timeout=TIMEOUT, **kwargs)


def test_a_foreign_origin_is_refused(plain: HttpServer) -> None:
    r = post(plain, headers={"Origin": "http://evil.example"}, json=INITIALIZE)
    assert r.status_code == 403, r.text
    # The control: the server's own origin is accepted.
    ok = post(plain, headers={"Origin": f"http://127.0.0.1:{plain.port}"}, json=INITIALIZE)
    assert ok.status_code == 200, ok.text


def test_a_foreign_host_header_is_refused(plain: HttpServer) -> None:
    # DNS rebinding: the SDK's TransportSecurityMiddleware answers a bad Host with 421.
    r = post(plain, headers={"Host": "evil.example"}, json=INITIALIZE)
    assert r.status_code == 421, r.text
    r = post(plain, headers={"Host": f"evil.example:{plain.port}"}, json=INITIALIZE)
    assert r.status_code == 421, r.text


def test_a_body_over_4_mib_is_refused(plain: HttpServer) -> None:
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "' + b"x" * MAX_BODY_BYTES + b'"}}'
    assert len(body) > 4 * 1024 * 1024
    r = post(plain, content=body)
    assert r.status_code == 413, r.text

    # Without Content-Length (chunked), the limit holds while reading.
    def chunks() -> Iterator[bytes]:
        for _ in range(5):
            yield b" " * (1024 * 1024)

    r = post(plain, content=chunks())
    assert r.status_code == 413, r.text


async def test_sdk_client_over_http_lists_tools_and_searches(plain: HttpServer, http_photos: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with Client(plain.url) as client:
            assert {t.name for t in (await client.list_tools()).tools} == TOOLS
            indexed = structured(await client.call_tool("index_folder", {"path": str(http_photos)}))
            assert indexed["scanned"] == 4 and indexed["store_total"] == 4
            found = structured(
                await client.call_tool("search_images", {"query": "a blue square", "top_k": 2, "cutoff": "none"})
            )
            assert [h["rank"] for h in found["hits"]] == [1, 2]
            assert all(Path(h["path"]).parent == http_photos for h in found["hits"])


def test_requests_without_the_bearer_token_get_401(guarded: HttpServer) -> None:
    for auth in (None, "Bearer wrong-token-of-some-length", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x"):
        headers = {"Authorization": auth} if auth else {}
        r = post(guarded, headers=headers, json=INITIALIZE)
        assert r.status_code == 401, (auth, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    ok = post(guarded, headers={"Authorization": f"Bearer {TOKEN}"}, json=INITIALIZE)
    assert ok.status_code == 200, ok.text


async def test_sdk_client_with_the_bearer_token_works(guarded: HttpServer) -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
            Client(streamable_http_client(guarded.url, http_client=http)) as client,
        ):
            assert {t.name for t in (await client.list_tools()).tools} == TOOLS
            out = structured(await client.call_tool("search_images", {"query": "anything"}))
            assert out["hits"] == [] and "index_folder" in out["hint"]


def test_binding_every_interface_without_a_token_exits_2(tiny_clip: Path, http_photos: Path, tmp_path: Path) -> None:
    port = free_port()
    args = ["serve", "--http", "--host", "0.0.0.0", "--port", str(port), "--model", str(tiny_clip)]
    started = time.monotonic()
    done = finish(start_cli([*args, "--db", str(tmp_path / "db"), "--allow", str(http_photos)], isolated_env(tmp_path)))
    assert done.returncode == 2, done
    assert "token is required" in done.stderr and "--token" in done.stderr and ENV_TOKEN in done.stderr
    assert done.stdout == ""
    assert time.monotonic() - started < TIMEOUT
    assert not (tmp_path / "db").exists()  # refused before the engine opened anything


def test_build_http_app_refuses_unsafe_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_TOKEN, raising=False)
    server = build_server(Settings(model="unused/not-loaded", db_dir=tmp_path / "db"))
    with pytest.raises(HttpConfigError, match="8 characters; use at least 16"):
        build_http_app(server, host="127.0.0.1", port=8765, token="short-12")
    with pytest.raises(HttpConfigError, match="bearer token is required"):
        build_http_app(server, host="0.0.0.0", port=8765, token=None)
    with pytest.raises(HttpConfigError, match="--allowed-host"):
        build_http_app(server, host="0.0.0.0", port=8765, token=TOKEN)
    assert build_http_app(server, host="0.0.0.0", port=8765, token=TOKEN, extra_hosts=["box.lan:8765"])
    assert build_http_app(server, host="127.0.0.1", port=8765, token=None)
    monkeypatch.setenv(ENV_TOKEN, "short")
    with pytest.raises(HttpConfigError, match="5 characters"):
        build_http_app(server, host="127.0.0.1", port=8765, token=None)


def test_security_settings_name_the_bind_address() -> None:
    loop = security_settings("127.0.0.1", 8765, [])
    assert loop.enable_dns_rebinding_protection
    assert set(loop.allowed_hosts) == {"127.0.0.1:8765", "localhost:8765", "[::1]:8765"}
    assert "http://localhost:8765" in loop.allowed_origins and "http://evil.example" not in loop.allowed_origins
    lan = security_settings("192.168.1.5", 8765, ["box.lan:8765"])
    assert {"192.168.1.5:8765", "box.lan:8765"} <= set(lan.allowed_hosts)
    assert {"http://192.168.1.5:8765", "http://box.lan:8765"} <= set(lan.allowed_origins)
    v6 = security_settings("fd00::5", 8765, [])
    assert "[fd00::5]:8765" in v6.allowed_hosts and "http://[fd00::5]:8765" in v6.allowed_origins
    every = security_settings("0.0.0.0", 8765, ["box.lan:8765"])
    assert not any(h.startswith("0.0.0.0") for h in every.allowed_hosts)
