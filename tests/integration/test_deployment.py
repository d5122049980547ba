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
import shutil
import signal
import sqlite3
import ssl
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from flwr.cli.build import build_fab_from_disk

from client.approval import app_hash
from shared.daemon import APP_ROOT
from shared.data.site import load_site
from shared.wire import DEVICES, PHASES
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
    # node ids are the ones registration gave: a site keeps its identity across restarts
    joined = dict(store(federation, "SELECT site, node_id FROM sites"))
    assert {k: int(v) for k, v in joined.items()} == federation.nodes
    listed = ok(fedretina("server", "sites", "--state", str(federation.state)))
    assert all(name in listed for name in SITES)


def test_a_secure_round_sums_the_two_sites_over_tls(federation: Federation, tls_run) -> None:
    """SecAgg+ across SuperNodes, whose ClientApps run in a new process per message: the protocol's state
    lives in the node's context between its four stages, and the server records no site's norm."""
    secure = federation.run(
        "secure",
        rounds_pretrain=1,
        rounds_finetune=0,
        min_sites=2,
        connect_deadline_s=180,
        secure_aggregation=True,
    )
    ok(secure)
    assert federation.store("secure", "SELECT phase, accepted, status FROM rounds") == [("pretrain", 2, "ok")]
    hidden = federation.store(
        "secure", "SELECT aggregated, update_norm, cosine FROM replies WHERE kind = 'train'"
    )
    assert hidden == [(1, None, None), (1, None, None)]


def test_each_site_reads_only_the_site_its_node_config_names(federation: Federation, tls_run) -> None:
    images = dict(store(federation, "SELECT site, images FROM sites"))
    assert images == {n: len(load_site(p).rows) for n, p in federation.sites.items()}


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


def test_an_insecure_node_is_refused(federation: Federation, tiny_sites: dict[str, Path]) -> None:
    (port,) = free_ports(1)
    bin_dir = Path(FEDRETINA).parent
    argv = [str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{federation.port}"]
    argv += [
        "--max-wait-time",
        "10",
        "--port",
        str(port),
        "--node-config",
        f'site-config="{tiny_sites["aptos"]}"',
    ]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    log = federation.root / "insecure-node.log"
    with log.open("w") as out:  # a file, not a pipe: the node's SuperExec child may outlive it a while
        node = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        code = node.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
    output = log.read_text()
    assert code != 0 and "400 Bad Request" in output, output[-2000:]  # plain HTTP on the TLS port
    assert registered_nodes(federation) == set(federation.nodes.values())  # nobody joined besides the sites


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
    """A copy of this app (the files its bundle holds) with one line added: at import, the ClientApp
    module writes `marker`."""
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(APP_ROOT))) as bundle:
        bundle.extractall(folder)
    shutil.rmtree(folder / ".info", ignore_errors=True)
    module = folder / "client" / "app.py"
    module.write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + module.read_text())
    return folder


def test_a_site_runs_only_the_app_versions_it_approved(
    federation: Federation, tls_run, tmp_path: Path
) -> None:
    ok(tls_run)  # the approved version ran on both sites
    marker = tmp_path / "unapproved-code-ran"
    app = changed_app(tmp_path / "app", marker)
    digest = app_hash(str(app))
    result = federation.run(
        "unapproved",
        "--app",
        str(app),
        rounds_pretrain=1,
        rounds_finetune=0,
        min_sites=2,
        connect_deadline_s=30,
    )
    assert result.returncode != 0
    assert not marker.exists()  # refused before any of the changed app's code ran
    refusals = federation.store("unapproved", "SELECT message FROM events WHERE kind = 'site-error'")
    assert len(refusals) == 2, refusals
    assert all("AppNotApproved" in m and digest in m for (m,) in refusals), refusals
    for site in federation.sites.values():
        log = (load_site(site).config.state_root / "daemon" / "supernode.log").read_text()
        assert f"refused app {digest}" in log
        assert f"refused   {digest}" in ok(fedretina("site", "approvals", str(site)))
