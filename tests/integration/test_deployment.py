"""Deployment with real processes on localhost: `fedretina certs create`, `fedretina server start` (a TLS
SuperLink with node authentication behind nginx), two `fedretina site serve` daemons with their own keys,
and a two-phase run over TLS, one site training on two devices (two processes joined by gloo), then a
round through secure aggregation (SecAgg+). An unregistered key and an insecure node are refused, the
Control API cannot be reached through the sites' address, each site reads only the site its node config
names, no secret reaches a log or the run store, and a site refuses an app version it has not approved
before any of its code runs."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import select
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from flwr.cli.build import build_fab_from_disk

from client.approval import app_hash
from shared.data.site import load_site
from shared.federation.wire import DEVICES, PHASES
from shared.operations.daemon import APP_ROOT, descendants
from tests.conftest import FEDRETINA
from tests.integration.deployment import Federation, deployed, fedretina, free_ports, ok

pytestmark = pytest.mark.integration
SITES = ("eyepacs", "mmac")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, tiny_sites: dict[str, Path]) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("deployment")
    sites = {n: tiny_sites[n] for n in SITES}
    two = yaml.safe_load(sites["mmac"].read_text()) | {"devices": 2}  # a site with a two-device box
    sites["mmac"] = root / "mmac-two-devices.yaml"
    sites["mmac"].write_text(yaml.safe_dump(two))
    with deployed(root, sites) as fed:
        yield fed


@pytest.fixture(scope="module")
def tls_run(federation: Federation) -> subprocess.CompletedProcess[str]:
    return federation.run("tls", rounds_pretrain=1, rounds_finetune=1, min_sites=2, connect_deadline_s=180)


def store(federation: Federation, sql: str) -> list[tuple]:
    return federation.store("tls", sql)


def test_two_sites_run_both_phases_over_tls_with_node_authentication(federation: Federation, tls_run) -> None:
    ok(tls_run)
    assert store(federation, "SELECT status, scenario FROM runs") == [("completed", "deployment")]
    rounds = store(federation, "SELECT phase, sampled, accepted, status FROM rounds ORDER BY phase DESC")
    assert rounds == [("pretrain", 2, 2, "ok"), ("finetune", 2, 2, "ok")]
    trained = store(federation, "SELECT phase, site, metrics FROM replies WHERE kind = 'train'")
    devices = {(phase, site): json.loads(metrics)[DEVICES] for phase, site, metrics in trained}
    assert devices == {(p, s): 2 if s == "mmac" else 1 for p in PHASES for s in SITES}
    # after phase 2 every site scored the final model on its held-out test patients, over the same wire
    assert store(federation, "SELECT site FROM replies WHERE kind = 'test' ORDER BY site") == [
        (s,) for s in sorted(SITES)
    ]
    # node ids are the ones registration gave: a site keeps its identity across restarts
    joined = dict(store(federation, "SELECT site, node_id FROM sites"))
    assert {k: int(v) for k, v in joined.items()} == federation.nodes
    listed = ok(fedretina("server", "sites", "--state", str(federation.state)))
    assert all(name in listed for name in SITES)


@dataclass(frozen=True)
class ChangedApp:
    """A changed version of this app (`changed_app`), refused by both sites, then approved by both."""

    folder: Path
    digest: str
    marker: Path  # where its planted lines write, with the process that ran them
    refused: subprocess.CompletedProcess[str]  # the run before the sites approved it


@pytest.fixture(scope="module")
def changed(federation: Federation, tls_run, tmp_path_factory: pytest.TempPathFactory) -> ChangedApp:
    root = tmp_path_factory.mktemp("changed-app")
    marker = root / "bundle-code-ran"
    app = changed_app(root / "app", marker)
    one_round = {"rounds_pretrain": 1, "rounds_finetune": 0, "min_sites": 2}
    refused = federation.run("unapproved", "--app", str(app), **one_round, connect_deadline_s=30)
    at_sites = [x for x in marker.read_text().splitlines() if not x.endswith(" server")]  # (the ServerApp's)
    assert at_sites == []  # refused at every site before any of the changed app's code ran there
    for site in federation.sites.values():  # each hospital reviews the new version and approves it
        ok(fedretina("site", "approve", str(site), str(app)))
    return ChangedApp(app, app_hash(str(app)), marker, refused)


@pytest.fixture(scope="module")
def secure_run(federation: Federation, changed: ChangedApp) -> subprocess.CompletedProcess[str]:
    """One pretraining round under secure aggregation, of the changed version the sites approved."""
    return federation.run(
        "secure",
        "--app",
        str(changed.folder),
        rounds_pretrain=1,
        rounds_finetune=0,
        min_sites=2,
        connect_deadline_s=180,
        secure_aggregation=True,
    )


def test_a_secure_round_sums_the_two_sites_over_tls(federation: Federation, secure_run) -> None:
    """SecAgg+ across SuperNodes, whose ClientApps run in a new process per message: the protocol's state
    lives in the node's context between its four stages, and the server records no site's norm."""
    ok(secure_run)
    assert federation.store("secure", "SELECT phase, accepted, status FROM rounds") == [("pretrain", 2, "ok")]
    hidden = federation.store(
        "secure", "SELECT aggregated, update_norm, cosine FROM replies WHERE kind = 'train'"
    )
    assert hidden == [(1, None, None), (1, None, None)]


def test_each_site_reads_only_the_site_its_node_config_names(federation: Federation, tls_run) -> None:
    images = dict(store(federation, "SELECT site, images FROM sites"))
    assert images == {n: len(load_site(p).rows) for n, p in federation.sites.items()}


@pytest.mark.security
def test_an_unregistered_key_is_refused(federation: Federation, tiny_sites: dict[str, Path]) -> None:
    stranger = tiny_sites["aptos"]
    ok(fedretina("site", "keys", str(stranger)))
    (port,) = free_ports(1)
    serve = fedretina(
        "site",
        "serve",
        str(stranger),
        "--superlink",
        f"127.0.0.1:{federation.port}",
        "--ca",
        str(federation.bundle / "ca.crt"),
        "--port",
        str(port),
        "--foreground",
        timeout=120,
    )
    log = (load_site(stranger).config.state_root / "daemon" / "supernode.log").read_text()
    assert serve.returncode != 0 and "Failed to activate SuperNode" in log, log[-2000:]


@pytest.mark.security
def test_an_insecure_node_is_refused(federation: Federation, tiny_sites: dict[str, Path]) -> None:
    flags = ["--insecure", "--max-wait-time", "10"]
    code, output = rogue_node(federation, tiny_sites["aptos"], "insecure-node", *flags)
    assert code != 0 and "400 Bad Request" in output, output[-2000:]  # plain HTTP on the TLS port
    assert registered_nodes(federation) == set(federation.nodes.values())  # nobody joined besides the sites


def rogue_node(federation: Federation, site: Path, name: str, *flags: str) -> tuple[int, str]:
    """A bare `flower-supernode` for `site` against the federation's address with `flags` (no daemon of
    ours): its exit code and its output."""
    (port,) = free_ports(1)
    bin_dir = Path(FEDRETINA).parent
    argv = [str(bin_dir / "flower-supernode"), "--superlink", f"127.0.0.1:{federation.port}", *flags]
    argv += ["--port", str(port), "--node-config", f'site-config="{site}"']
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    log = federation.root / f"{name}.log"
    with log.open("w") as out:  # a file, not a pipe: the node's SuperExec child may outlive it a while
        node = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        code = node.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
    return code, log.read_text()


def registered_nodes(federation: Federation) -> set[int]:
    listed = ok(fedretina("server", "sites", "--state", str(federation.state)))
    return {int(line.split("node ")[1].split()[0]) for line in listed.splitlines() if "node " in line}


def post(port: int, path: str, ca: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        connection.request("POST", path, body=b"", headers={"Content-Type": "application/protobuf"})
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.security
def test_the_control_api_is_not_reachable_through_the_sites_address(federation: Federation) -> None:
    ca = federation.bundle / "ca.crt"
    for api in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/acquire-task", "/docs"):
        assert post(federation.port, api, ca) == 404, api
    assert post(federation.link, "/v1/control/list-runs", ca) != 404  # the operator's loopback still has it
    assert post(federation.port, "/v1/fleet/get-run", ca) != 404  # what sites need goes through
    public = federation.root / "public-home"
    public.mkdir(exist_ok=True)
    (public / "config.toml").write_text(
        f'[superlink]\ndefault = "public"\n[superlink.public]\naddress = "127.0.0.1:{federation.port}"\n'
        f'root-certificates = "{ca}"\n'
    )
    listed = subprocess.run(
        [str(Path(FEDRETINA).parent / "flwr"), "ls", "public"],
        capture_output=True,
        text=True,
        env={"FLWR_HOME": str(public), "PATH": "/usr/bin:/bin"},
        timeout=60,
        check=False,
    )
    assert listed.returncode != 0 and "tls" not in listed.stdout


@pytest.mark.security
def test_no_secret_reaches_a_log_or_the_run_store(federation: Federation, tls_run) -> None:
    secrets = [federation.bundle / "ca.key", federation.bundle / "server.key"]
    secrets += [load_site(p).config.state_root / "keys" / "site.key" for p in federation.sites.values()]
    needles = ["PRIVATE KEY"] + [_key_material(p) for p in secrets]
    logs = [*(federation.state / "logs").glob("*"), *(federation.state / "runs").rglob("log.txt")]
    logs += [
        load_site(p).config.state_root / "daemon" / name
        for p in federation.sites.values()
        for name in ("supernode.log", "daemon.log")
    ]
    texts = {str(p): p.read_text(errors="replace") for p in logs if p.is_file()}
    db = sqlite3.connect(federation.state / "runs" / "tls" / "federation" / "store.sqlite")
    with contextlib.closing(db):
        texts["store"] = "\n".join(
            str(row)
            for t in ("runs", "sites", "replies", "events", "metrics")
            for row in db.execute(f"SELECT * FROM {t}")
        )
    assert len(texts) > 4
    for where, text in texts.items():
        assert not any(n in text for n in needles), f"a secret in {where}"


def _key_material(path: Path) -> str:
    """A run of the key's own bytes as they would appear if printed (base64 of its private number)."""
    data = path.read_bytes()
    key = (
        serialization.load_ssh_private_key(data, None)
        if b"OPENSSH" in data
        else serialization.load_pem_private_key(data, None)
    )
    number = key.private_numbers().private_value  # type: ignore[union-attr]
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.b64encode(raw).decode()[:24]


def changed_app(folder: Path, marker: Path) -> Path:
    """A copy of this app (the files its bundle holds) with a line added to one module of its own `client/`
    and one of its `shared/` (both imported by the ClientApp): at import, each appends its name to
    `marker`, with the site it ran at. Only the bundle's code can write it; the site's installed copy has no
    such line."""
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(APP_ROOT))) as bundle:
        bundle.extractall(folder)
    shutil.rmtree(folder / ".info", ignore_errors=True)
    for module in ("client/rounds.py", "shared/federation/wire.py"):
        path = folder / module
        future = "from __future__ import annotations\n"  # must stay first: the marker goes after it
        where = "__import__('os').environ.get('FEDRETINA_SITE_STATE', 'server')"  # which process ran it
        line = f"open({str(marker)!r}, 'a').write({module!r} + ' ' + {where} + '\\n')\n"
        path.write_text(path.read_text().replace(future, future + line, 1))
    return folder


@pytest.mark.security
def test_a_site_runs_only_the_app_versions_it_approved_and_then_that_bundles_own_code(
    federation: Federation, tls_run, changed: ChangedApp, secure_run
) -> None:
    ok(tls_run)  # the approved version ran on both sites
    assert changed.refused.returncode != 0
    refusals = federation.store("unapproved", "SELECT message FROM events WHERE kind = 'site-error'")
    assert len(refusals) == 2, refusals
    assert all("AppNotApproved" in m and changed.digest in m for (m,) in refusals), refusals
    for site in federation.sites.values():
        log = (load_site(site).config.state_root / "daemon" / "supernode.log").read_text()
        assert f"refused app {changed.digest}" in log
        assert f"approved  {changed.digest}" in ok(fedretina("site", "approvals", str(site)))
    ok(secure_run)  # once approved, the changed version ran (its secure round)
    ran = set(changed.marker.read_text().splitlines())
    for site in federation.sites.values():  # at each site, the bundle's own client/ and shared/ ran
        state = load_site(site).config.state_root
        assert {f"client/rounds.py {state}", f"shared/federation/wire.py {state}"} <= ran, ran
        installed = state / "apps" / "installed" / changed.digest
        assert str(changed.marker) in (installed / "client" / "rounds.py").read_text()


def superlink_rss(federation: Federation) -> int:
    """The resident memory (bytes) of this federation's SuperLink process."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if any(b"fedretina-superlink" in a for a in argv) and str(federation.link).encode() in argv:
                    pages = int((entry / "statm").read_text().split()[1])
                    return pages * os.sysconf("SC_PAGE_SIZE")
    raise AssertionError("no SuperLink process found")


def hostile_post(port: int, ca: Path, *, chunked: bool, signed: bool, size: int = 256 << 20) -> int:
    """An unauthenticated client posting a `size`-byte body to the Fleet API through the proxy, streamed
    1 MiB at a time until the server answers or closes; the HTTP status it got (0: cut off unanswered)."""
    context = ssl.create_default_context(cafile=str(ca))
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    with context.wrap_socket(raw, server_hostname="localhost") as conn:
        head = [
            "POST /v1/fleet/push-object HTTP/1.1",
            "Host: localhost",
            "Content-Type: application/protobuf",
        ]
        head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}")
        if signed:  # a forged signature: the right headers, no registered key behind them
            head += [
                "flwr-public-key: AAAA",
                "flwr-signature: AAAA",
                "flwr-timestamp: 2026-01-01T00:00:00+00:00",
            ]
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        block, answer = b"\0" * (1 << 20), None
        try:
            for _ in range(size >> 20):
                conn.sendall(b"100000\r\n" + block + b"\r\n" if chunked else block)
                if answer := _answered(conn):
                    break
            if chunked and answer is None:
                conn.sendall(b"0\r\n\r\n")
            conn.settimeout(120)  # a server that read it all answers after the last byte
            answer = answer or conn.recv(64)
        except OSError:
            return 0  # the server closed the connection: refused
        status = answer.split(b" ")
        return int(status[1]) if len(status) > 1 and status[1].isdigit() else 0


def _answered(conn: ssl.SSLSocket) -> bytes | None:
    """The server's first bytes if it has answered already (a TLS record that carries none, such as a
    session ticket, is not an answer)."""
    if not select.select([conn], [], [], 0)[0]:
        return None
    conn.setblocking(False)
    try:
        return conn.recv(64) or b"closed"
    except (ssl.SSLWantReadError, BlockingIOError):
        return None
    finally:
        conn.settimeout(30)


@pytest.mark.security
def test_unauthenticated_bodies_leave_the_superlinks_memory_flat(federation: Federation, tls_run) -> None:
    """50 unauthenticated 256 MiB posts (half declared, half chunked; half with a forged signature): each
    refused before its body reaches the SuperLink, whose memory stays within 10%."""
    ca = federation.bundle / "ca.crt"
    before = superlink_rss(federation)
    statuses = [hostile_post(federation.port, ca, chunked=i % 2 == 1, signed=i % 4 >= 2) for i in range(50)]
    after = superlink_rss(federation)
    print(f"\nSuperLink RSS {before / 1e6:.0f} MB -> {after / 1e6:.0f} MB after 50 unauthenticated posts")
    print("their answers:", dict(sorted(Counter(statuses).items())))
    assert all(s in (0, 401, 413, 429) for s in statuses), statuses
    assert after <= 1.10 * before, (before, after)


@pytest.mark.security
def test_a_slow_body_is_cut_at_once_and_the_sites_still_get_through(federation: Federation, tls_run) -> None:
    """A client dribbling a small unsigned body gets its answer from the headers, not after the body."""
    context = ssl.create_default_context(cafile=str(federation.bundle / "ca.crt"))
    raw = socket.create_connection(("127.0.0.1", federation.port), timeout=30)
    started = time.monotonic()
    with context.wrap_socket(raw, server_hostname="localhost") as conn:
        conn.sendall(
            b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\nxx"
        )
        reply = conn.recv(64)
    assert reply.split(b" ")[1] in (b"401", b"429") and time.monotonic() - started < 20, (
        reply
    )  # not after nginx's 30 s body timeout
    listed = ok(fedretina("server", "sites", "--state", str(federation.state)))
    assert listed.count("online") == len(SITES), listed  # the real sites were not crowded out


@pytest.mark.security
def test_a_stolen_key_is_refused_while_its_site_is_online(federation: Federation, tiny_sites) -> None:
    """Another machine with eyepacs's private key cannot take eyepacs's place while eyepacs serves."""
    stolen = load_site(federation.sites["eyepacs"]).config.state_root / "keys" / "site.key"
    flags = [
        "--root-certificates",
        str(federation.bundle / "ca.crt"),
        "--auth-supernode-private-key",
        str(stolen),
    ]
    code, output = rogue_node(federation, tiny_sites["aptos"], "stolen-key", *flags)
    assert code != 0 and "Failed to activate SuperNode" in output, output[-2000:]


@pytest.mark.security
def test_state_folders_and_files_are_their_owners_only(federation: Federation, tls_run) -> None:
    """Server and site state: folders 0700, files 0600 (the SuperLink's database and the logs included)."""
    roots = [federation.state, *(load_site(p).config.state_root for p in federation.sites.values())]
    loose = []
    for root in roots:
        for path in [root, *root.rglob("*")]:
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                continue  # the gate's link (its target is the venv's) and sockets
            if path.stat().st_mode & 0o077:
                loose.append(f"{oct(path.stat().st_mode & 0o777)} {path}")
    assert (federation.state / "superlink.db").is_file() and not loose, loose[:20]


@pytest.mark.security
def test_a_killed_supervisor_leaves_nothing_and_the_site_serves_again(federation: Federation) -> None:
    """SIGKILL a site daemon's supervisor: its SuperNode and what that started (SuperExec, in a session of
    its own) go with it; `site stop` finds nothing left; serving again joins at once. Last of the module:
    it disturbs a site."""
    site = federation.sites["eyepacs"]
    folder = load_site(site).config.state_root / "daemon"
    supervisor = int((folder / "supernode.pid").read_text())
    family = descendants(supervisor)
    assert len(family) >= 2  # the SuperNode and its SuperExec
    os.kill(supervisor, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in family), "the daemon's processes outlived it"
    assert ok(fedretina("site", "stop", str(site))).strip() == "no daemon was serving this site"
    federation.serve("eyepacs")
    assert len(descendants(int((folder / "supernode.pid").read_text()))) >= 2


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"  # a zombie is gone too
    except OSError:
        return False
