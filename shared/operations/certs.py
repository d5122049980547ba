"""A federation's keys and certificates, made with the `cryptography` package (no openssl scripts).

A bundle folder holds:

    ca.crt            the federation's CA certificate: public, every site gets it
    ca.key            the CA's private key: secret, keep it offline once the server certificate is made
    server.crt/.key   the SuperLink's certificate (the server's DNS names and IPs) and its key (secret)
    sites/<name>.key  a site's EC private key, OpenSSH format as Flower reads it: secret, that site's alone
    sites/<name>.pub  its public key: registered on the server (`fedretina server add-site`)

Secret files are written 0600, nothing is overwritten without `force`, and `check_bundle` says in one line per
problem what is wrong with a bundle (expired, wrong SAN, a key that does not match its certificate).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import ConfigError

CA_DAYS, SERVER_DAYS = 3650, 825
LOOPBACK = ("localhost", "127.0.0.1")
SECRET_MODE = 0o600


@dataclass(frozen=True)
class Bundle:
    """Where a bundle's files are (they may not exist yet)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def site_key(self, name: str) -> Path:
        return self.root / "sites" / f"{name}.key"

    def site_public(self, name: str) -> Path:
        return self.root / "sites" / f"{name}.pub"

    def sites(self) -> list[str]:
        folder = self.root / "sites"
        return sorted(p.stem for p in folder.glob("*.pub")) if folder.is_dir() else []


def create_bundle(
    root: Path, sans: Iterable[str], sites: Iterable[str], *, force: bool = False
) -> list[Path]:
    """A CA (reused when the bundle has one and `force` is off), a server certificate for `sans` (DNS names
    or IP addresses), and one key pair per site; returns the files written. Refuses, before writing
    anything, to overwrite an existing file unless `force`."""
    bundle, sans, sites = Bundle(root), list(sans), list(sites)
    if not sans:
        raise ConfigError(
            "--san: give the server's DNS names and IP addresses, e.g. --san localhost --san 127.0.0.1"
        )
    sans = list(dict.fromkeys([*sans, *LOOPBACK]))
    reuse_ca = bundle.ca_cert.exists() and bundle.ca_key.exists() and not force
    targets = [bundle.server_cert, bundle.server_key] + [
        p for s in sites for p in (bundle.site_key(s), bundle.site_public(s))
    ]
    taken = [p for p in targets if p.exists()]
    if taken and not force:
        raise ConfigError(
            f"{taken[0]} exists: pass --force to replace the bundle's files, or choose another --out"
        )
    written: list[Path] = []
    if reuse_ca:
        ca_key = serialization.load_pem_private_key(bundle.ca_key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(bundle.ca_cert.read_bytes())
    else:
        ca_key, ca_cert = _new_ca()
        written += [
            _write(bundle.ca_key, _pem_key(ca_key), secret=True),
            _write(bundle.ca_cert, _pem_cert(ca_cert)),
        ]
    key, cert = _server_certificate(ca_key, ca_cert, sans)  # type: ignore[arg-type]
    written += [
        _write(bundle.server_key, _pem_key(key), secret=True),
        _write(bundle.server_cert, _pem_cert(cert)),
    ]
    for site in sites:
        written += write_site_key(bundle.site_key(site), bundle.site_public(site), site)
    return written


def write_site_key(private_path: Path, public_path: Path, site: str) -> list[Path]:
    """A site's EC P-384 key pair in OpenSSH format (Flower's node authentication reads that)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return [
        _write(private_path, private, secret=True),
        _write(public_path, public + f" fedretina-site-{site}\n".encode()),
    ]


def check_bundle(root: Path, host: str | None = None, now: dt.datetime | None = None) -> list[str]:
    """Every problem with the bundle at `root`, one line each (empty when it is sound); `host` is a name or
    IP address the server certificate must be valid for."""
    bundle, now = Bundle(root), now or dt.datetime.now(dt.UTC)
    missing = [p for p in (bundle.ca_cert, bundle.server_cert, bundle.server_key) if not p.is_file()]
    if missing:
        return [f"{p}: missing; create the bundle with `fedretina certs create`" for p in missing]
    problems: list[str] = []
    ca = x509.load_pem_x509_certificate(bundle.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(bundle.server_cert.read_bytes())
    problems += _validity(bundle.ca_cert, ca, now) + _validity(bundle.server_cert, cert, now)
    if not _signed_by(cert, ca):
        problems.append(
            f"{bundle.server_cert}: not signed by {bundle.ca_cert}; make both with `fedretina certs create`"
        )
    key = serialization.load_pem_private_key(bundle.server_key.read_bytes(), password=None)
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        problems.append(f"{bundle.server_key}: does not belong to {bundle.server_cert}")
    if host is not None and host not in server_names(cert):
        problems.append(
            f"{bundle.server_cert}: not valid for {host!r} (it names {', '.join(server_names(cert))})"
        )
    for site in bundle.sites():
        problems += _site_problems(bundle, site)
    secrets = [bundle.ca_key, bundle.server_key, *(bundle.site_key(s) for s in bundle.sites())]
    for path in (p for p in secrets if p.is_file() and p.stat().st_mode & 0o077):
        problems.append(f"{path}: readable by others (mode {path.stat().st_mode & 0o777:o}); chmod 600 it")
    return problems


def server_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        *san.get_values_for_type(x509.DNSName),
        *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
    ]


def _site_problems(bundle: Bundle, site: str) -> list[str]:
    private, public = bundle.site_key(site), bundle.site_public(site)
    if not private.is_file():
        return []  # the operator holds only public keys when sites made their own
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    pub = serialization.load_ssh_public_key(public.read_bytes())
    if key.public_key().public_numbers() != pub.public_numbers():  # type: ignore[union-attr]
        return [f"{private}: does not belong to {public}"]
    return []


def _validity(path: Path, cert: x509.Certificate, now: dt.datetime) -> list[str]:
    if now < cert.not_valid_before_utc:
        return [f"{path}: not valid before {cert.not_valid_before_utc:%Y-%m-%d}; check this machine's clock"]
    if now > cert.not_valid_after_utc:
        return [
            f"{path}: expired on {cert.not_valid_after_utc:%Y-%m-%d}; renew: `fedretina certs create --force`"
        ]
    return []


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _new_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedretina federation CA")])
    cert = (
        _builder(name, name, key.public_key(), CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _server_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, sans: list[str]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])])
    cert = (
        _builder(subject, ca.subject, key.public_key(), SERVER_DAYS)
        .add_extension(x509.SubjectAlternativeName([_general_name(s) for s in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _builder(
    subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(
        minutes=5
    )  # a site's clock a little behind still accepts it
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
    )


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(san: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        return x509.DNSName(san)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, *, secret: bool = False) -> Path:
    """Write through a temporary file created with the final mode (a secret is never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SECRET_MODE if secret else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return path
