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

from shared.daemon import APP_ROOT
from shared.data.site import load_site
from tests.conftest import FEDRETINA


@dataclass(frozen=True)
class Federation:
    root: Path
    bundle: Path
    state: Path
    port: int  # the sites' address (nginx)
    link: int  # the SuperLink's, loopback only
    sites: dict[str, Path]  # name -> site YAML
    nodes: dict[str, int]  # name -> node id given at registration

    def run(self, name: str, *flags: str, **federation: object) -> subprocess.CompletedProcess[str]:
        """`fedretina server run` of a tiny two-phase experiment with these federation settings."""
        return fedretina(*self.run_args(name, **federation), *flags, timeout=900)

    def run_args(self, name: str, **federation: object) -> list[str]:
        experiment = self.root / f"{name}.yaml"
        experiment.write_text(yaml.safe_dump({"profile": "tiny", "federation": federation}))
        return ["server", "run", "-c", str(experiment), "--state", str(self.state), "--name", name]

    def store(self, run: str, sql: str) -> list[tuple]:
        db = sqlite3.connect(self.state / "runs" / run / "federation" / "store.sqlite")
        with contextlib.closing(db):
            return db.execute(sql).fetchall()


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
def deployed(root: Path, sites: dict[str, Path]) -> Iterator[Federation]:
    """A TLS server with node authentication and one daemon per site, all stopped on exit."""
    bundle, state = root / "certs", root / "server"
    port, link, *node_ports = free_ports(2 + len(sites))
    ok(fedretina("certs", "create", "--out", str(bundle), "--san", "localhost"))
    listen = ["--listen", f"127.0.0.1:{port}", "--link-port", str(link)]
    ok(fedretina("server", "start", "--certs", str(bundle), "--state", str(state), *listen))
    served: list[Path] = []
    try:
        nodes = {}
        for (name, site), node_port in zip(sites.items(), node_ports, strict=True):
            ok(fedretina("site", "keys", str(site)))
            ok(fedretina("site", "approve", str(site), str(APP_ROOT)))
            public = load_site(site).config.state_root / "keys" / "site.pub"
            added = ok(fedretina("server", "add-site", name, str(public), "--state", str(state)))
            nodes[name] = int(added.split()[-1])
            tls = ["--ca", str(bundle / "ca.crt"), "--port", str(node_port)]
            ok(fedretina("site", "serve", str(site), "--superlink", f"127.0.0.1:{port}", *tls))
            served.append(site)
        yield Federation(root, bundle, state, port, link, dict(sites), nodes)
    finally:
        for site in served:
            fedretina("site", "stop", str(site))
        fedretina("server", "stop", "--state", str(state))
