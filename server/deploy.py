"""The federation server in deployment: a SuperLink that sites reach only through a proxy showing them the
Fleet API, with TLS and node authentication on by default.

Why the proxy: in open-source Flower 1.41 one uvicorn serves the Fleet API (sites), the Control API (which
launches runs, i.e. ships code to every site, and registers node keys) and the Runtime API on one port, and
the Control API has no authentication. So the SuperLink listens on loopback only, and nginx (Debian's) listens
on the public address with the server certificate and forwards `/v1/fleet/` alone, re-encrypting to the
SuperLink and verifying its certificate against the federation's CA. Everything else answers 404. The
operator reaches the Control API on loopback (on the server, or through an SSH tunnel).

The server folder (`--state`):

    server.json     how it was started (addresses, bundle, insecure); what add-site / sites / run read
    superlink.db    the SuperLink's state (runs, registered nodes): it survives a restart
    sites.json      the registered sites' names and node ids (`fedretina server add-site`)
    logs/           superlink.log, nginx's error.log and access.log, server.log (detached start)
    nginx/          the generated nginx.conf and its pid
    flwr-home/      FLWR_HOME of the SuperLink and of the operator's `flwr` calls (connection "fedretina")
    runs/           the federated runs' outputs (store, checkpoints, models)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from server.fleet_guard import FLEET_PREFIX, MAX_FLEET_BODY, SIGNATURE_HEADER
from shared.errors import ConfigError
from shared.operations.certs import Bundle, check_bundle
from shared.operations.daemon import (
    APP_ROOT,
    MARKER,
    VENV_BIN,
    DaemonError,
    detach,
    supervise,
    this_command,
    wait_for_port,
)
from shared.rundir import private_dir

log = logging.getLogger(__name__)
CONNECTION = "fedretina"  # the operator's connection to this server's SuperLink, in flwr-home/config.toml
# What an address that sends requests no node signed (only an attacker's, under node authentication) may
# make per second, and how many connections any one address may hold open.
UNSIGNED_RATE, UNSIGNED_BURST, CONNECTIONS_PER_ADDRESS = "5r/s", 10, 64
PROXY_NAME = "localhost"  # the name nginx checks the SuperLink's certificate for (it matches DNS names only)


@dataclass(frozen=True)
class ServerSettings:
    state: Path
    bundle: Path | None  # None: --insecure
    host: str  # the sites' address (nginx listens here)
    port: int
    link_port: int  # the SuperLink's, on 127.0.0.1 only

    @property
    def insecure(self) -> bool:
        return self.bundle is None

    @property
    def home(self) -> Path:
        return self.state / "flwr-home"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    def save(self) -> None:
        record = asdict(self) | {
            "state": str(self.state),
            "bundle": str(self.bundle) if self.bundle else None,
        }
        (self.state / "server.json").write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def load(cls, state: Path) -> ServerSettings:
        path = state / "server.json"
        if not path.is_file():
            raise ConfigError(
                f"{path}: no server here; start one with `fedretina server start --state {state}`"
            )
        record = json.loads(path.read_text())
        return cls(
            Path(record["state"]),
            Path(record["bundle"]) if record["bundle"] else None,
            record["host"],
            int(record["port"]),
            int(record["link_port"]),
        )


def prepare(settings: ServerSettings) -> list[tuple[list[str], Path]]:
    """Check the bundle, write nginx's config and the operator's connection; the two processes to run."""
    if settings.bundle is not None:
        problems = check_bundle(settings.bundle, host=PROXY_NAME)
        if problems:
            raise ConfigError(f"{problems[0]} (the proxy reaches the SuperLink as {PROXY_NAME!r})")
    if shutil.which("nginx") is None:
        raise DaemonError("nginx is not installed: `apt-get install nginx-light` (Debian), then start again")
    private_dir(settings.state, tree=True)  # also what an older version left readable
    for folder in (settings.logs, settings.state / "nginx", settings.home):
        private_dir(folder)
    conf = settings.state / "nginx" / "nginx.conf"
    conf.write_text(nginx_conf(settings))
    _write_connection(settings)
    settings.save()
    nginx = ["nginx", "-p", str(settings.state / "nginx"), "-c", str(conf), "-g", "daemon off;"]
    return [
        (superlink_command(settings), settings.logs / "superlink.log"),
        (nginx, settings.logs / "nginx.log"),
    ]


def start_server(settings: ServerSettings, *, foreground: bool) -> None:
    """Run the SuperLink and the proxy: supervised in this process, or detached until `server stop`."""
    commands = prepare(settings)
    if settings.insecure:
        log.warning(
            "the server runs WITHOUT TLS and node authentication (--insecure): anyone who reaches %s:%d can "
            "read the weights and join as a site; use it on a closed test network only",
            settings.host,
            settings.port,
        )
    if foreground:
        raise SystemExit(supervise(commands, flwr_env(settings), cwd=settings.state))
    listen = ["--listen", f"{settings.host}:{settings.port}", "--link-port", str(settings.link_port)]
    tls = ["--certs", str(settings.bundle)] if settings.bundle else ["--insecure"]
    argv = [
        *this_command(),
        "-q",
        "server",
        "start",
        "--state",
        str(settings.state),
        *listen,
        *tls,
        "--foreground",
    ]
    out = settings.logs / "server.log"
    process = detach(argv, out, settings.state / "server.pid", flwr_env(settings), settings.state)
    wait_for_port("127.0.0.1", settings.link_port, 90, process, out)
    wait_for_port(_reachable(settings.host), settings.port, 30, process, out)
    log.info(
        "server ready (pid %d): sites connect to %s:%d; logs in %s",
        process.pid,
        settings.host,
        settings.port,
        settings.logs,
    )


def superlink_command(settings: ServerSettings) -> list[str]:
    """The SuperLink on loopback, its state on disk; TLS and node authentication unless insecure. Flower's
    own, started through `server/superlink.py` for a longer database lock timeout."""
    argv = [str(VENV_BIN / "fedretina-superlink"), "--host", "127.0.0.1", "--port", str(settings.link_port)]
    argv += ["--database", str(settings.state / "superlink.db"), "--disable-runtime-dependency-installation"]
    if settings.bundle is None:
        return [*argv, "--insecure"]
    bundle = Bundle(settings.bundle)
    tls = {
        "--ssl-ca-certfile": bundle.ca_cert,
        "--ssl-certfile": bundle.server_cert,
        "--ssl-keyfile": bundle.server_key,
    }
    return [*argv, *(x for flag, path in tls.items() for x in (flag, str(path))), "--enable-supernode-auth"]


def nginx_conf(settings: ServerSettings) -> str:
    """The proxy: the sites' address forwards only the Fleet API to the loopback SuperLink. Request and
    response buffering is off, so nginx's workers never write a temporary file. Upstream connections are
    not kept alive: in our one try with keep-alive, a round's concurrent object pushes held Flower 1.41's
    SQLite state past its 5 s busy timeout ("database is locked", a 500 that ended the run).

    Bounded for the unauthenticated: a body is at most one array chunk and its framing (`MAX_FLEET_BODY`,
    whatever the model's size; larger ones get 413 unread), headers and bodies must arrive in time (a slow
    body is cut), one address holds at most `CONNECTIONS_PER_ADDRESS` connections, and under node
    authentication requests no node signed are rate-limited per address. Behind it the SuperLink's own
    guard (`server/fleet_guard.py`) refuses them before reading a byte of their body."""
    logs = settings.logs
    scheme = "http" if settings.bundle is None else "https"
    tls, upstream_tls = "", ""
    if settings.bundle is not None:
        bundle = Bundle(settings.bundle)
        tls = (
            f"ssl_certificate {bundle.server_cert};\n        ssl_certificate_key {bundle.server_key};\n"
            "        ssl_protocols TLSv1.2 TLSv1.3;"
        )
        upstream_tls = (
            f"proxy_ssl_verify on;\n            proxy_ssl_trusted_certificate {bundle.ca_cert};\n"
            f"            proxy_ssl_name {PROXY_NAME};"
        )
    unsigned = (
        f"limit_req zone=unsigned burst={UNSIGNED_BURST} nodelay;" if settings.bundle is not None else ""
    )
    return f"""# written by `fedretina server start`; regenerated on every start
worker_processes 1;
pid {settings.state / "nginx" / "nginx.pid"};
error_log {logs / "nginx-error.log"} warn;
events {{ worker_connections 512; }}
http {{
    access_log {logs / "nginx-access.log"};
    client_body_temp_path {settings.state / "nginx" / "body"};
    proxy_temp_path {settings.state / "nginx" / "proxy"};
    client_max_body_size {MAX_FLEET_BODY};
    client_header_timeout 15s;
    client_body_timeout 30s;
    send_timeout 60s;
    proxy_request_buffering off;
    proxy_buffering off;
    server_tokens off;
    map $http_{SIGNATURE_HEADER.replace("-", "_")} $unsigned {{ "" $binary_remote_addr; default ""; }}
    limit_req_zone $unsigned zone=unsigned:1m rate={UNSIGNED_RATE};
    limit_conn_zone $binary_remote_addr zone=address:1m;
    limit_req_status 429;
    limit_conn_status 429;
    server {{
        listen {settings.host}:{settings.port}{" ssl" if settings.bundle is not None else ""};
        {tls}
        limit_conn address {CONNECTIONS_PER_ADDRESS};
        location {FLEET_PREFIX} {{
            {unsigned}
            proxy_pass {scheme}://127.0.0.1:{settings.link_port};
            proxy_http_version 1.1;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
            {upstream_tls}
        }}
        location / {{ return 404; }}
    }}
}}
"""


def flwr_env(settings: ServerSettings) -> dict[str, str]:
    """The environment of the SuperLink and of the operator's `flwr` calls against it."""
    return {
        **os.environ,
        "FLWR_HOME": str(settings.home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # the app runs in this environment, as tested
        MARKER: str(settings.state.resolve()),  # `server stop` finds every process of this server
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def flwr(settings: ServerSettings, *args: str, stream: bool = False) -> subprocess.CompletedProcess[str]:
    """A `flwr` CLI call on the operator's connection, from the app's folder."""
    argv = [str(VENV_BIN / "flwr"), *args]
    out = None if stream else subprocess.PIPE
    return subprocess.run(
        argv, env=flwr_env(settings), cwd=APP_ROOT, stdout=out, stderr=out, text=True, check=False
    )


def register_site(settings: ServerSettings, name: str, public_key: Path) -> int:
    """Register a site's public key (node authentication); returns its node id, fixed from now on. The
    server's own `sites.json` keeps the names (Flower lists nodes by id only)."""
    if not public_key.is_file():
        raise ConfigError(f"{public_key}: no such public key; the site makes it with `fedretina site keys`")
    known = site_names(settings)
    if name in known:
        raise ConfigError(
            f"site {name} is registered already (node {known[name]}); unregister it to rotate its key"
        )
    args = [
        "supernode",
        "register",
        str(public_key.resolve()),
        CONNECTION,
        "--name",
        name,
        "--format",
        "json",
    ]
    done = flwr(settings, *args)
    record = _json_tail(done.stdout)
    if done.returncode != 0 or not record.get("node-id"):
        raise DaemonError(f"registering {name}: {_reason(done)}")
    known[name] = int(record["node-id"])
    (settings.state / "sites.json").write_text(json.dumps(known, indent=2) + "\n")
    return known[name]


def registered_sites(settings: ServerSettings) -> list[tuple[str, int, str]]:
    """(name, node id, status: registered / online / offline) of every node the SuperLink knows."""
    done = flwr(settings, "supernode", "list", CONNECTION, "--format", "json")
    if done.returncode != 0:
        raise DaemonError(f"listing sites: {_reason(done)}")
    names = {node: name for name, node in site_names(settings).items()}
    nodes = _json_tail(done.stdout).get("nodes", [])
    return [(names.get(int(n["node-id"]), "?"), int(n["node-id"]), str(n["status"])) for n in nodes]


def site_names(settings: ServerSettings) -> dict[str, int]:
    """Registered site name -> node id (the server's own record; Flower lists nodes by id only)."""
    path = settings.state / "sites.json"
    return {k: int(v) for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}


def _reachable(host: str) -> str:
    """An address to test a listening socket on: the wildcard is reached through loopback."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def _write_connection(settings: ServerSettings) -> None:
    entry = f'address = "127.0.0.1:{settings.link_port}"\n'
    entry += (
        "insecure = true\n"
        if settings.bundle is None
        else f'root-certificates = "{Bundle(settings.bundle).ca_cert.resolve()}"\n'
    )
    text = f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n{entry}'
    (settings.home / "config.toml").write_text(text)


def _json_tail(stdout: str) -> dict:
    """The JSON object `flwr ... --format json` prints last."""
    start = stdout.find("{")
    try:
        return json.loads(stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


def _reason(done: subprocess.CompletedProcess[str]) -> str:
    record = _json_tail(done.stdout)
    text = record.get("error-message") or (done.stderr or done.stdout or "").strip()
    return text.splitlines()[-1] if text else f"exit code {done.returncode}"
