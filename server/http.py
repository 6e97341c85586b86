"""Streamable HTTP transport, locked down: loopback by default, Origin and Host checks, and a
bearer token whenever the bind address is not loopback."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

ENV_TOKEN = "CLIPLENS_HTTP_TOKEN"
MAX_BODY_BYTES = 4 * 1024 * 1024
MIN_TOKEN_CHARS = 16


class HttpConfigError(ValueError):
    """The HTTP settings would expose the server; the message says what is required."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BearerTokenMiddleware:
    """Refuse every HTTP request without `Authorization: Bearer <token>` (constant-time compare)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [(b"content-type", b"text/plain"), (b"www-authenticate", b"Bearer")],
                    }
                )
                await send({"type": "http.response.body", "body": b"missing or wrong bearer token\n"})
                return
        await self.app(scope, receive, send)


def security_settings(host: str, port: int, extra_hosts: list[str]) -> TransportSecuritySettings:
    names = ["127.0.0.1", "localhost", "[::1]"]
    if not is_loopback(host) and host not in ("0.0.0.0", "::"):
        names.append(f"[{host}]" if ":" in host else host)  # IPv6 literals are bracketed in Host/Origin
    hosts = [f"{n}:{port}" for n in names] + list(extra_hosts)
    origins = [f"http://{n}:{port}" for n in names] + [f"http://{h}" for h in extra_hosts]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


def check_exposure(host: str, token: str | None, extra_hosts: list[str] | None = None) -> str | None:
    """The bearer token to require (flag, else environment), or HttpConfigError when the
    settings would expose the server. Called before the model loads, so it fails at once."""
    token = token or os.environ.get(ENV_TOKEN) or None
    if not is_loopback(host):
        if not token:
            raise HttpConfigError(
                f"--host {host} is not loopback: a bearer token is required "
                f"(--token or {ENV_TOKEN}, at least {MIN_TOKEN_CHARS} characters)"
            )
        if host in ("0.0.0.0", "::") and not extra_hosts:
            raise HttpConfigError(
                f"--host {host} binds every interface: name the Host values clients use with --allowed-host"
            )
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise HttpConfigError(f"the bearer token is {len(token)} characters; use at least {MIN_TOKEN_CHARS}")
    return token


def build_http_app(
    server: MCPServer[Any], *, host: str, port: int, token: str | None, extra_hosts: list[str] | None = None
) -> ASGIApp:
    """The ASGI app, or HttpConfigError when the settings would expose the server."""
    token = check_exposure(host, token, extra_hosts)
    app: ASGIApp = server.streamable_http_app(
        transport_security=security_settings(host, port, list(extra_hosts or [])),
        max_request_body_size=MAX_BODY_BYTES,
        host=host,
    )
    if token:
        app = BearerTokenMiddleware(app, token)
    return app


def serve_http(
    server: MCPServer[Any], *, host: str, port: int, token: str | None, extra_hosts: list[str] | None = None
) -> int:
    import uvicorn

    app = build_http_app(server, host=host, port=port, token=token, extra_hosts=extra_hosts)
    log.warning("cliplens serving streamable HTTP on http://%s:%d/mcp", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
