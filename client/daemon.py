"""`fedretina site serve`: a hospital's long-lived site daemon, a Flower SuperNode for one site YAML.

It checks the site first (a site with fatal problems is refused), then runs `flower-supernode` with the
federation's CA, the site's own private key (node authentication: the server knows only its public key) and
the site YAML as the node's only config, so the ClientApp learns where its data is from that path and
nothing else. The SuperNode reconnects by itself after a server outage (no retry limit). ClientApps run in
subprocesses, a new one per message (Flower's default isolation), each through the gate that runs only the
app versions the site approved (`client/gate.py`). Everything the daemon writes goes to the site's state
folder, never into the dataset:

    <state>/keys/site.key, site.pub    made by `fedretina site keys` (the private key never leaves the site)
    <state>/daemon/supernode.log       Flower's and the ClientApps' output
    <state>/daemon/supernode.pid       while detached
    <state>/daemon/flwr-home/          Flower's home: the installed copies of the app the server sent
    <state>/daemon/bin/flwr-clientapp  the gate, first on the SuperNode's PATH
    <state>/apps/                      approved app hashes, refused bundles, installed approved apps

`site serve` says the site is served only once the SuperLink has activated its node (Flower's "SuperNode
ID" line). A node restarted within the SuperLink's heartbeat window after a crash is refused ("Failed to
activate SuperNode": its earlier session still counts as online, up to 2 x 30 s). A daemon that ran
within that window (`<state>/daemon/alive`, touched while it runs) starts its node again until the window
has passed (`ACTIVATION_WINDOW_S`); any other refusal (an unregistered key) ends it at once.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from client.approval import Approvals
from client.gate import STATE_ENV
from client.node import SITE_KEY
from shared.data.checks import check_site
from shared.data.site_config import SiteConfig
from shared.errors import ConfigError, DataError
from shared.federation.wire import CHUNK_BYTES
from shared.operations.certs import write_site_key
from shared.operations.daemon import (
    MARKER,
    VENV_BIN,
    DaemonError,
    detach,
    supervise,
    this_command,
    wait_for_line,
    wait_for_port,
)
from shared.rundir import private_dir

log = logging.getLogger(__name__)
ACTIVATED = "SuperNode ID:"  # what Flower's SuperNode logs once the SuperLink activated it
REFUSED = "Failed to activate SuperNode"  # the SuperLink's refusal (an unknown key, or a session online)
# Flower keeps a node online 2 heartbeats (2 x 30 s) after its last; the daemon tries a little past that.
ACTIVATION_WINDOW_S = 80.0


@dataclass(frozen=True)
class SiteDaemon:
    config: SiteConfig
    superlink: str  # host:port of the server's proxy
    ca: Path | None  # None: --insecure
    key: Path | None  # the site's private key (None: --insecure)
    port: int  # the SuperNode's local Runtime API (one per site on a machine)

    @property
    def folder(self) -> Path:
        return self.folder_of(self.config)

    @staticmethod
    def folder_of(config: SiteConfig) -> Path:
        return config.state_root / "daemon"

    @property
    def log(self) -> Path:
        return self.folder / "supernode.log"

    @property
    def pidfile(self) -> Path:
        return self.folder / "supernode.pid"

    @property
    def alive(self) -> Path:
        """Touched every few seconds while the daemon runs: when its node last held a session."""
        return self.folder / "alive"

    def command(self) -> list[str]:
        """flower-supernode for this site: TLS with the federation's CA and its own key, unless insecure."""
        source = self.config.source
        if source is None:
            raise ConfigError(f"site {self.config.name}: serve it from its YAML file")
        argv = [str(VENV_BIN / "flower-supernode"), "--superlink", self.superlink, "--port", str(self.port)]
        argv += ["--node-config", f'{SITE_KEY}="{Path(source).resolve()}"']
        if self.ca is None or self.key is None:
            return [*argv, "--insecure"]
        return [*argv, "--root-certificates", str(self.ca), "--auth-supernode-private-key", str(self.key)]

    def env(self) -> dict[str, str]:
        """The SuperNode's environment: Flower's home in the state folder, and the gate first on PATH."""
        return {
            **os.environ,
            "FLWR_HOME": str(self.folder / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            STATE_ENV: str(self.config.state_root),
            MARKER: str(self.folder.resolve()),
            "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE": str(CHUNK_BYTES),  # the server bounds bodies by it
            "PATH": os.pathsep.join([str(self.gate().parent), str(VENV_BIN), os.environ.get("PATH", "")]),
        }

    def gate(self) -> Path:
        """`<daemon>/bin/flwr-clientapp`, the name the SuperExec starts for each message, pointing at the
        gate that checks the app's approval before any of it runs (`client/gate.py`)."""
        link = self.folder / "bin" / "flwr-clientapp"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(VENV_BIN / "fedretina-clientapp")
        return link


def serve_site(
    config: SiteConfig,
    superlink: str,
    ca: Path | None,
    key: Path | None,
    *,
    port: int,
    insecure: bool,
    foreground: bool,
    checked: bool = False,
) -> None:
    """Check the site, then run its SuperNode: supervised here (`foreground`), or detached."""
    ca, key = _credentials(config, ca, key, insecure)
    private_dir(config.state_root, tree=True)  # also what an older version left readable
    daemon = SiteDaemon(config, superlink, ca, key, port)
    if not checked:
        log.info("%s", ready_to_serve(config))
        if not Approvals(config.state_root).approved():
            log.warning(
                "site %s has approved no app yet: every run is refused until `fedretina site approve`",
                config.name,
            )
    if foreground:
        commands = [(daemon.command(), daemon.log)]
        since = time.time() - daemon.alive.stat().st_mtime if daemon.alive.exists() else math.inf
        restart = functools.partial(_still_online, ACTIVATION_WINDOW_S - since)
        raise SystemExit(supervise(commands, daemon.env(), daemon.folder, restart, daemon.alive))
    tls = ["--insecure"] if ca is None else ["--ca", str(ca), "--key", str(key)]
    argv = [
        *this_command(),
        "-q",
        "site",
        "serve",
        str(Path(str(config.source)).resolve()),
        "--superlink",
        superlink,
    ]
    argv += ["--port", str(port), *tls, "--foreground", "--checked"]
    out = daemon.folder / "daemon.log"
    offset = daemon.log.stat().st_size if daemon.log.exists() else 0
    process = detach(argv, out, daemon.pidfile, daemon.env(), daemon.folder)
    wait_for_port("127.0.0.1", port, 60, process, out)
    try:
        joined = wait_for_line(daemon.log, offset, ACTIVATED, ACTIVATION_WINDOW_S + 30, process)
    except DaemonError as exc:
        raise DaemonError(f"site {config.name} did not join {superlink}: {exc}") from None
    node = joined.rsplit(ACTIVATED, 1)[1].strip()
    log.info(
        "site %s joined %s as node %s (daemon pid %d); log %s",
        config.name,
        superlink,
        node,
        process.pid,
        daemon.log,
    )


def _still_online(window_s: float, code: int, said: str, elapsed_s: float) -> bool:
    """Start the SuperNode again while the SuperLink refuses it and its last session (`window_s` seconds
    of the heartbeat window were left when the daemon started) may still count as online; any other end
    is the daemon's end."""
    retry = code != 0 and REFUSED in said and elapsed_s < window_s  # (Flower's 305 exits as 305 % 256)
    if retry:
        log.warning(
            "the server still holds this node's last session (it ran %.0f s ago); trying again",
            ACTIVATION_WINDOW_S - window_s,
        )
    return retry


def _credentials(
    config: SiteConfig, ca: Path | None, key: Path | None, insecure: bool
) -> tuple[Path | None, Path | None]:
    """(CA certificate, private key) to serve with, both checked to exist; (None, None) when insecure."""
    if insecure:
        log.warning("site %s is served WITHOUT TLS and node authentication (--insecure)", config.name)
        return None, None
    if ca is None or not ca.is_file():
        raise ConfigError(f"--ca: {ca or 'missing'}: give the federation's CA certificate, or --insecure")
    key = key or default_key(config)
    if not key.is_file():
        raise ConfigError(
            f"--key: {key}: no private key; make one with `fedretina site keys {config.source}`"
        )
    return ca.resolve(), key.resolve()


def ready_to_serve(config: SiteConfig, workers: int = 2) -> str:
    """Check the site as `site check` does (report in its state folder); refuse one with fatal problems."""
    result = check_site(config, workers=workers)
    if result.fatal:
        raise DataError(f"{config.name}: {result.fatal[0].line()}; fix it, then `fedretina site check` again")
    return result.text.splitlines()[0]


def site_keys(config: SiteConfig, *, force: bool = False) -> tuple[Path, Path]:
    """The site's key pair in its state folder (made once; `force` replaces it). Send only the .pub."""
    private, public = default_key(config), default_key(config).with_suffix(".pub")
    if not private.exists() or force:
        write_site_key(private, public, config.name)
    return private, public


def default_key(config: SiteConfig) -> Path:
    return config.state_root / "keys" / "site.key"
