"""`fedretina certs`: a bundle Flower accepts (a CA-signed server certificate with the SANs asked for, site
keys in OpenSSH format on a NIST curve), secret files 0600 and never overwritten without --force, and a
check that names each problem in one line."""

from __future__ import annotations

import datetime as dt
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

from shared.errors import ConfigError
from shared.operations.certs import Bundle, check_bundle, create_bundle, server_names
from tests.conftest import FEDRETINA


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    create_bundle(tmp_path / "certs", ["fl.example.org", "10.0.0.7"], ["eyepacs", "mmac"])
    return Bundle(tmp_path / "certs")


def test_a_bundle_has_a_signed_server_certificate_and_site_keys_flower_reads(bundle: Bundle) -> None:
    cert = x509.load_pem_x509_certificate(bundle.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(bundle.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert server_names(cert) == ["fl.example.org", "localhost", "10.0.0.7", "127.0.0.1"]  # + the proxy hop
    for site in ("eyepacs", "mmac"):
        key = serialization.load_ssh_private_key(bundle.site_key(site).read_bytes(), password=None)
        assert uses_nist_ec_curve(key.public_key())  # type: ignore[arg-type]
    secrets = [bundle.ca_key, bundle.server_key, bundle.site_key("eyepacs"), bundle.site_key("mmac")]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in secrets)
    assert check_bundle(bundle.root, host="fl.example.org") == []


def test_nothing_is_overwritten_without_force_and_the_ca_is_kept(bundle: Bundle) -> None:
    ca, server = bundle.ca_cert.read_bytes(), bundle.server_cert.read_bytes()
    with pytest.raises(ConfigError, match=r"server.crt exists: pass --force"):
        create_bundle(bundle.root, ["fl.example.org"], [])
    assert bundle.server_cert.read_bytes() == server
    bundle.server_cert.unlink()
    bundle.server_key.unlink()
    create_bundle(bundle.root, ["fl2.example.org"], [])  # a renewed server certificate, the same CA
    assert bundle.ca_cert.read_bytes() == ca and check_bundle(bundle.root, host="fl2.example.org") == []
    create_bundle(bundle.root, ["fl.example.org"], [], force=True)
    assert bundle.ca_cert.read_bytes() != ca


def test_the_check_names_each_problem_in_one_line(bundle: Bundle, tmp_path: Path) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=900)
    assert any("server.crt: expired on" in p for p in check_bundle(bundle.root, now=later))
    assert check_bundle(bundle.root, host="evil.example.org") == [
        f"{bundle.server_cert}: not valid for 'evil.example.org' "
        "(it names fl.example.org, localhost, 10.0.0.7, 127.0.0.1)"
    ]
    other = create_bundle(tmp_path / "other", ["x.org"], ["eyepacs"])
    bundle.server_key.write_bytes(Path(next(p for p in other if p.name == "server.key")).read_bytes())
    bundle.site_key("mmac").write_bytes(Bundle(tmp_path / "other").site_key("eyepacs").read_bytes())
    bundle.ca_key.chmod(0o644)
    problems = check_bundle(bundle.root)
    assert f"{bundle.server_key}: does not belong to {bundle.server_cert}" in problems
    assert f"{bundle.site_key('mmac')}: does not belong to {bundle.site_public('mmac')}" in problems
    assert f"{bundle.ca_key}: readable by others (mode 644); chmod 600 it" in problems
    assert all("\n" not in p for p in problems)


def test_the_cli_exits_2_with_one_line_per_problem(bundle: Bundle) -> None:
    done = subprocess.run(
        [FEDRETINA, "certs", "check", str(bundle.root), "--host", "nope.org"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (
        done.returncode == 2
        and done.stderr.count("fedretina: error:") == 1
        and "not valid for 'nope.org'" in done.stderr
    )
