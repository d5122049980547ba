"""A whole deployment on localhost, from the commands a federation's people type: `fedretina certs create`,
`fedretina server start`, per site `fedretina site keys` + `fedretina server add-site` + `fedretina site
approve` (this app) + `fedretina site serve`, then `fedretina server run`; stopped again on exit. Used by
the deployment and fault tests and the bench."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from client.approval import app_hash
from shared.data.site import load_site
from shared.operations.daemon import APP_ROOT
from tests.conftest import FEDRETINA
from tests.integration.slow_link import Bucket, slow_link


@dataclass(frozen=True)
class Federation:
    root: Path
    bundle: Path
    state: Path
    port: int  # the sites' address (nginx)
    link: int  # the SuperLink's, loopback only
    sites: dict[str, Path]  # name -> site YAML
    nodes: dict[str, int]  # name -> node id given at registration
    node_ports: dict[str, int]  # name -> the site's local Runtime API port
    site_port: int = 0  # where the sites connect: `port`, or a slow link's relay in front of it
    slow: dict[str, Bucket] | None = None  # the slow link's two directions (bytes carried), if any

    def run(self, name: str, *flags: str, **federation: object) -> subprocess.CompletedProcess[str]:
        """`fedretina server run` of a tiny two-phase experiment with these federation settings."""
        return fedretina(*self.run_args(name, **federation), *flags, timeout=900)

    def run_args(self, name: str, threads: int = 0, profile: str = "tiny", **federation: object) -> list[str]:
        experiment = self.root / f"{name}.yaml"
        experiment.write_text(
            yaml.safe_dump({"profile": profile, "threads": threads, "federation": federation})
        )
        return ["server", "run", "-c", str(experiment), "--state", str(self.state), "--name", name]

    def store(self, run: str, sql: str) -> list[tuple]:
        db = sqlite3.connect(self.state / "runs" / run / "federation" / "store.sqlite")
        with contextlib.closing(db):
            return db.execute(sql).fetchall()

    def start_server(self) -> None:
        listen = ["--listen", f"127.0.0.1:{self.port}", "--link-port", str(self.link)]
        ok(fedretina("server", "start", "--certs", str(self.bundle), "--state", str(self.state), *listen))

    def serve(self, name: str) -> None:
        """`fedretina site serve` of one site, detached (again, after a fault: same key, same port)."""
        tls = ["--ca", str(self.bundle / "ca.crt"), "--port", str(self.node_ports[name])]
        address = f"127.0.0.1:{self.site_port or self.port}"
        ok(fedretina("site", "serve", str(self.sites[name]), "--superlink", address, *tls))


def fedretina(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FEDRETINA, *args], capture_output=True, text=True, timeout=timeout, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@contextlib.contextmanager
def deployed(root: Path, sites: dict[str, Path], link_rate: float = 0) -> Iterator[Federation]:
    """A TLS server with node authentication and one daemon per site, all stopped on exit; with
    `link_rate`, the sites reach the server through a link of that many bytes/s each way."""
    with contextlib.ExitStack() as stack:
        port, link, *node_ports = free_ports(2 + len(sites))
        relay, buckets = stack.enter_context(slow_link(port, link_rate)) if link_rate else (port, None)
        fed = Federation(
            root,
            root / "certs",
            root / "server",
            port,
            link,
            dict(sites),
            {},
            dict(zip(sites, node_ports, strict=True)),
            relay,
            buckets,
        )
        yield from _started(fed)


def _started(fed: Federation) -> Iterator[Federation]:
    sites = fed.sites
    ok(fedretina("certs", "create", "--out", str(fed.bundle), "--san", "localhost"))
    fed.start_server()
    this_app = app_hash(str(APP_ROOT))  # what `server run` will send, approved by hash at each site
    try:
        for name, site in sites.items():
            ok(fedretina("site", "keys", str(site)))
            ok(fedretina("site", "approve", str(site), this_app))
            public = load_site(site).config.state_root / "keys" / "site.pub"
            added = ok(fedretina("server", "add-site", name, str(public), "--state", str(fed.state)))
            fed.nodes[name] = int(added.split()[-1])
            fed.serve(name)
        yield fed
    finally:
        for site in sites.values():
            fedretina("site", "stop", str(site))
        fedretina("server", "stop", "--state", str(fed.state))
