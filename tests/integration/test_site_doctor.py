"""`fedretina site doctor` against a real TLS server (nginx in front of the SuperLink, node authentication
on), each fault planted for real: the line that names it, and exit 0 only for the healthy site."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from client.approval import app_hash
from client.doctor import Finding, diagnose
from shared.data.site import load_site
from shared.operations.daemon import APP_ROOT
from tests.conftest import write_site
from tests.integration.deployment import fedretina, free_ports, ok

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path | str]]:
    """A started server, a registered site that approved this app, and a second site it never registered."""
    root = tmp_path_factory.mktemp("doctor")
    port, link = free_ports(2)
    bundle, state = root / "certs", root / "server"
    ok(fedretina("certs", "create", "--out", str(bundle), "--san", "localhost"))
    ok(fedretina("certs", "create", "--out", str(root / "other-certs"), "--san", "localhost"))
    listen = ["--listen", f"127.0.0.1:{port}", "--link-port", str(link)]
    ok(fedretina("server", "start", "--certs", str(bundle), "--state", str(state), *listen))
    try:
        sites = {n: write_site(root / n, "eyepacs", 6, seed=i) for i, n in enumerate(("known", "stranger"))}
        for site in sites.values():
            ok(fedretina("site", "keys", str(site)))
            ok(fedretina("site", "approve", str(site), app_hash(str(APP_ROOT))))
        public = load_site(sites["known"]).config.state_root / "keys" / "site.pub"
        ok(fedretina("server", "add-site", "known", str(public), "--state", str(state)))
        yield {"root": root, "bundle": bundle, "state": state, "address": f"127.0.0.1:{port}", **sites}
    finally:
        fedretina("server", "stop", "--state", str(state))


def _lines(findings: list[Finding], check: str) -> str:
    return "\n".join(f.line() for f in findings if f.check == check)


def test_a_healthy_site_passes_every_check_and_exits_0(server: dict) -> None:
    done = fedretina(
        "site", "doctor", str(server["known"]), "--superlink", server["address"], "--ca",
        str(server["bundle"] / "ca.crt"),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    checks = ("site yaml", "dataset", "state", "disk", "key", "approvals", "resources", "dns", "tcp", "tls")
    for check in (*checks, "clock", "node key"):
        assert any(line.startswith("OK") and line[5:].startswith(check) for line in lines), check
    assert "OK   node key    site.pub is registered with the server" in lines
    assert lines[-1] == "the site can join"


def test_each_planted_fault_is_named_with_its_fix_and_the_exit_code_is_1(server: dict) -> None:
    ca, address = server["bundle"] / "ca.crt", server["address"]
    port = address.rsplit(":", 1)[1]

    # an unregistered key: the signed Fleet call is refused for that reason, and the site stays offline
    stranger = diagnose(server["stranger"], address, ca, None, False)
    assert "FAIL node key    the server does not know this site's key: send " in _lines(stranger, "node key")
    assert "`fedretina server add-site NAME FILE.pub`" in _lines(stranger, "node key")

    # the CA of another federation
    other = diagnose(server["known"], address, server["root"] / "other-certs" / "ca.crt", None, False)
    assert (
        f"is not signed by the CA in {server['root'] / 'other-certs' / 'ca.crt'}; get the federation's ca.crt"
        in (_lines(other, "tls"))
    )
    assert not any(f.check == "node key" for f in other)  # nothing after the first network failure

    # a name the certificate does not carry (127.1 reaches 127.0.0.1, but is not one of its names)
    renamed = diagnose(server["known"], f"127.1:{port}", ca, None, False)
    assert "is not valid for the name '127.1' (it names localhost, 127.0.0.1); connect with one of" in (
        _lines(renamed, "tls")
    )

    # the server down (nothing listens on that port)
    (closed,) = free_ports(1)
    down = fedretina(
        "site", "doctor", str(server["known"]), "--superlink", f"127.0.0.1:{closed}", "--ca", str(ca)
    )
    assert down.returncode == 1
    assert f"FAIL tcp         127.0.0.1:{closed}: connection refused: the server is down" in down.stdout
    assert down.stdout.splitlines()[-1] == "the site cannot join yet: fix the FAIL lines above"

    # the dataset folder gone (moved by someone): the YAML's root is refused with its fix
    known_root = load_site(server["known"]).config.root
    moved = known_root.with_name("moved")
    known_root.rename(moved)
    try:
        gone = diagnose(server["known"], address, ca, None, False)
    finally:
        moved.rename(known_root)
    assert f"FAIL site yaml   {server['known']}: root: {known_root} is not a directory" in gone[0].line()

    # a dataset whose label file is unreadable: `site check`'s fatal verdict, and where to read it
    labels = next(known_root.glob("*.csv"))
    saved = labels.with_suffix(".saved")
    shutil.move(labels, saved)
    try:
        broken = diagnose(server["known"], address, ca, None, False)
    finally:
        shutil.move(saved, labels)
    assert _lines(broken, "dataset").startswith("FAIL dataset")
    assert "`fedretina site check" in _lines(broken, "dataset")

    # the server's certificate expired while it ran (nginx reloads it, as after a renewal gone wrong)
    _expire_server_certificate(server["bundle"], server["state"])
    expired = diagnose(server["known"], address, ca, None, False)
    assert "the server's certificate expired on " in _lines(expired, "tls")
    assert "ask the operator to renew it" in _lines(expired, "tls")


def _expire_server_certificate(bundle: Path, state: Path) -> None:
    """Replace the server's certificate by the same one with a validity that ended yesterday, signed by the
    same CA, and have nginx load it."""
    cert = x509.load_pem_x509_certificate((bundle / "server.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((bundle / "ca.key").read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
    )
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    expired = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    (bundle / "server.crt").write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    os.kill(int((state / "nginx" / "nginx.pid").read_text()), signal.SIGHUP)
    time.sleep(1.0)  # the new workers take over
