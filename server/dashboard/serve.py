"""Serving the dashboard: loopback by default; any other address needs a token."""

from __future__ import annotations

import ipaddress
import secrets
from pathlib import Path

import uvicorn

from server.dashboard.app import create_app
from shared.errors import ConfigError

GENERATE = "generate"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token: str | None) -> str | None:
    """The token to require: none on loopback unless given; off loopback one is required."""
    if token == GENERATE:
        return secrets.token_urlsafe(24)
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"--host {host}: serving beyond this machine needs a token: pass --token <secret>, "
            f"or --token {GENERATE} to have one made and printed"
        )
    return token


def serve(root: Path, host: str, port: int, token: str | None) -> None:
    """Serve the dashboard over `root` until interrupted."""
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder; point the dashboard at a runs folder (default runs/)")
    token = resolve_token(host, token)
    query = f"/?token={token}" if token else "/"
    print(f"fedretina dashboard over {root.resolve()}: http://{host}:{port}{query}", flush=True)
    uvicorn.run(create_app(root, token), host=host, port=port, log_level="warning")
