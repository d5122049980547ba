"""`fedretina site doctor`: can this site join the federation, and if not, why? One line per check.

A site that cannot join only waits: a wrong CA, a name the server's certificate does not carry, a key the
operator never registered, a proxy in the way, a clock off by minutes all look the same from the site. The
doctor asks each question on its own, the network ones of the real server exactly as the SuperNode would
(TLS against the given CA and name, then a signed Fleet call), and says what to do about the answer.

The node-key check is an activation request with an out-of-range heartbeat interval: the SuperLink looks
the key up first (unknown: "Failed to activate", 412) and only then checks the interval (400, "Invalid
heartbeat interval"), so a registered key is confirmed without the node ever going online.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING

from client.approval import Approvals
from client.daemon import default_key
from shared.data.site_config import SiteConfig, load_site_config
from shared.errors import UserError

TIMEOUT_S = 10.0
MIN_FREE_BYTES = 2 << 30  # the decoded-image cache, the run state and the logs of a cpu-profile site
EXPIRY_WARNING = dt.timedelta(days=30)
REGISTERED, UNREGISTERED = 400, 412  # the SuperLink's answers to the key probe (see the module's text)
if TYPE_CHECKING:
    from cryptography.x509 import Certificate


@dataclass(frozen=True)
class Finding:
    """One check's verdict: `ok`, else `problem` says what is wrong and how to fix it."""

    check: str
    ok: bool
    detail: str
    warning: bool = False  # ok, but worth acting on (a certificate expiring soon)

    def line(self) -> str:
        mark = "WARN" if self.warning else ("OK" if self.ok else "FAIL")
        return f"{mark:<5}{self.check:<12}{self.detail}"


@dataclass(frozen=True)
class Target:
    """Where and how the site would connect."""

    host: str
    port: int
    ca: Path | None  # None: --insecure
    key: Path | None


def diagnose(
    site: Path, superlink: str | None, ca: Path | None, key: Path | None, insecure: bool
) -> list[Finding]:
    """Every check, in the order a site's IT would fix them; a check whose precondition failed says so."""
    try:
        config = load_site_config(site)
    except UserError as exc:
        return [Finding("site yaml", False, f"{exc}")]
    findings = [Finding("site yaml", True, f"{site}: site {config.name!r}, format {config.format}")]
    findings += [_dataset(config), _state(config), _disk(config)]
    if not insecure:
        findings.append(_key(config, key))
    findings += [_approvals(config), _resources(config)]
    if superlink is None:
        return [*findings, Finding("server", False, "not checked: give --superlink HOST:PORT (and --ca)")]
    try:
        target = _target(superlink, ca, key or default_key(config), insecure)
    except ValueError as exc:
        return [*findings, Finding("server", False, str(exc))]
    for check in _network_checks(target):
        finding = check(target)
        findings.append(finding)
        if not finding.ok:
            break  # each network check needs the one before it
    return findings


def report(findings: list[Finding]) -> tuple[str, bool]:
    """The printed lines and whether the site can join (every check ok)."""
    ready = all(f.ok for f in findings)
    verdict = "the site can join" if ready else "the site cannot join yet: fix the FAIL lines above"
    return "\n".join([*(f.line() for f in findings), verdict]), ready


# ------------------------------------------------------------------------------------------ the site
def _dataset(config: SiteConfig) -> Finding:
    from shared.data.checks import check_site

    root = config.root
    if not root.is_dir():
        return Finding("dataset", False, f"{root}: no such folder; fix `root:` in {config.source}")
    if not os.access(root, os.R_OK | os.X_OK):
        return Finding(
            "dataset",
            False,
            f"{root}: not readable by this user; grant read access (chmod/ACL) to the folder",
        )
    result = check_site(config)
    if result.fatal:
        problem = result.fatal[0].line()
        return Finding("dataset", False, f"{problem}; fix it, then `fedretina site check {config.source}`")
    return Finding("dataset", True, result.text.splitlines()[0])


def _state(config: SiteConfig) -> Finding:
    state = config.state_root
    try:
        state.mkdir(parents=True, exist_ok=True)
        probe = state / ".doctor-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return Finding(
            "state", False, f"{state}: not writable ({exc.strerror}); set `state_dir:` to a folder you own"
        )
    return Finding("state", True, f"{state}: writable, outside the dataset")


def _disk(config: SiteConfig) -> Finding:
    free = shutil.disk_usage(config.state_root).free
    detail = f"{free / 2**30:.1f} GiB free under {config.state_root}"
    if free < MIN_FREE_BYTES:
        return Finding("disk", False, f"{detail}; free at least {MIN_FREE_BYTES >> 30} GiB there")
    return Finding("disk", True, detail)


def _key(config: SiteConfig, key: Path | None) -> Finding:
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    key = key or default_key(config)
    if not key.is_file():
        return Finding("key", False, f"{key}: no private key; run `fedretina site keys {config.source}`")
    mode = stat.S_IMODE(key.stat().st_mode)
    if mode & 0o077:
        return Finding("key", False, f"{key}: readable by others (mode {mode:o}); run `chmod 600 {key}`")
    try:
        load_ssh_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        return Finding("key", False, f"{key}: not an OpenSSH private key ({exc}); make one with `site keys`")
    public = key.with_suffix(".pub")
    shown = f"; the operator registers {public}" if public.is_file() else ""
    return Finding("key", True, f"{key}: private (mode {mode:o}){shown}")


def _approvals(config: SiteConfig) -> Finding:
    approved = Approvals(config.state_root).approved()
    if not approved:
        return Finding(
            "approvals",
            False,
            "no app version approved: every run is refused; review the app, then "
            f"`fedretina site approve {config.source} <folder|.fab|hash>`",
        )
    shown = ", ".join(h[:12] for h in approved)
    return Finding("approvals", True, f"{len(approved)} app version(s) approved: {shown}")


def _resources(config: SiteConfig) -> Finding:
    import torch

    cpus = len(os.sched_getaffinity(0))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpus = torch.cuda.device_count()
    gpu = f"{gpus} GPU ({torch.cuda.get_device_name(0)})" if gpus else "no GPU (trains on CPU)"
    limits = config.limits
    return Finding(
        "resources",
        True,
        f"{cpus} CPUs, {memory:.0f} GiB memory, {gpu}; trains on at most {limits.threads} threads, "
        f"{config.devices} device(s)",
    )


# ------------------------------------------------------------------------------------------ the server
def _target(superlink: str, ca: Path | None, key: Path, insecure: bool) -> Target:
    host, sep, port = superlink.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--superlink {superlink!r}: give HOST:PORT, e.g. fl.hospital.org:9092")
    if not insecure and (ca is None or not ca.is_file()):
        raise ValueError(f"--ca: {ca or 'missing'}: give the federation's CA certificate, or --insecure")
    return Target(host.strip("[]"), int(port), None if insecure else ca, None if insecure else key)


def _network_checks(target: Target) -> list[Callable[[Target], Finding]]:
    checks = [_dns, _tcp]
    return checks + ([_tls, _clock, _registered] if target.ca is not None else [_clock])


def _dns(t: Target) -> Finding:
    try:
        found = sorted({a[4][0] for a in socket.getaddrinfo(t.host, t.port, type=socket.SOCK_STREAM)})
    except socket.gaierror as exc:
        return Finding("dns", False, f"{t.host}: does not resolve ({exc.strerror}); check the name or DNS")
    return Finding("dns", True, f"{t.host} -> {', '.join(found)}")


def _tcp(t: Target) -> Finding:
    try:
        with socket.create_connection((t.host, t.port), timeout=TIMEOUT_S):
            pass
    except ConnectionRefusedError:
        return Finding(
            "tcp",
            False,
            f"{t.host}:{t.port}: connection refused: the server is down or listens elsewhere; "
            "ask the operator to start it (`fedretina server start`)",
        )
    except TimeoutError:
        return Finding(
            "tcp",
            False,
            f"{t.host}:{t.port}: no answer in {TIMEOUT_S:.0f} s: a firewall or proxy drops it; "
            f"ask your network team to allow outgoing TCP to port {t.port}",
        )
    except OSError as exc:
        return Finding(
            "tcp", False, f"{t.host}:{t.port}: {exc.strerror or exc}; check the route to the server"
        )
    return Finding("tcp", True, f"{t.host}:{t.port} accepts connections")


def _tls(t: Target) -> Finding:
    assert t.ca is not None
    try:
        context = ssl.create_default_context(cafile=str(t.ca))
    except ssl.SSLError as exc:
        return Finding("tls", False, f"--ca {t.ca}: not a PEM certificate ({exc.reason}); get ca.crt again")
    try:
        der, version = _handshake(t, context)
    except ssl.SSLCertVerificationError as exc:
        return Finding("tls", False, _verify_problem(t, exc))
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        return Finding(
            "tls",
            False,
            f"{t.host}:{t.port}: no TLS handshake ({reason}): is something else on that port, "
            "or is the server started with --insecure?",
        )
    cert = _certificate(der)
    left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    names = ", ".join(_names(cert))
    detail = f"{version}, certificate for {names}, valid until {cert.not_valid_after_utc:%Y-%m-%d}"
    if left < EXPIRY_WARNING:
        return Finding("tls", True, f"{detail}: {left.days} days left; ask the operator to renew it", True)
    ca_left = _certificate_file(t.ca).not_valid_after_utc - dt.datetime.now(dt.UTC)
    if ca_left < EXPIRY_WARNING:
        return Finding("tls", True, f"{detail}; the CA expires in {ca_left.days} days", True)
    return Finding("tls", True, detail)


def _verify_problem(t: Target, exc: ssl.SSLCertVerificationError) -> str:
    """What a failed certificate verification means for the site, with the server's own certificate read
    (unverified, only to name what it says) where that helps."""
    where = f"{t.host}:{t.port}"
    code = exc.verify_code
    if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        names = ", ".join(_names(_unverified(t)))
        return (
            f"{where}: the server's certificate is not valid for the name {t.host!r} (it names {names}); "
            "connect with one of those names, or ask the operator for a certificate with "
            f"`fedretina certs create --san {t.host}`"
        )
    if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        expired = _unverified(t).not_valid_after_utc
        return (
            f"{where}: the server's certificate expired on {expired:%Y-%m-%d %H:%M} UTC; ask the operator to "
            "renew it (`fedretina certs create`, then restart the server)"
        )
    if code == 9:  # X509_V_ERR_CERT_NOT_YET_VALID
        return f"{where}: the server's certificate is not valid yet: check this machine's clock"
    if code in (2, 7, 18, 19, 20, 21):  # unknown issuer, another CA of the same name, self-signed, ...
        return (
            f"{where}: the server's certificate is not signed by the CA in {t.ca}; get the federation's "
            "ca.crt from its operator (a new `certs create` makes a new CA)"
        )
    return f"{where}: certificate verification failed ({exc.verify_message}); ask the operator"


def _clock(t: Target) -> Finding:
    """The server's clock from its HTTP Date header (nginx answers every request with one): node
    authentication refuses signatures stamped too far from the server's time."""
    import httpx
    from flwr.common.constant import SYSTEM_TIME_TOLERANCE

    scheme = "http" if t.ca is None else "https"
    verify: ssl.SSLContext | bool = False if t.ca is None else ssl.create_default_context(cafile=str(t.ca))
    try:
        before = dt.datetime.now(dt.UTC)
        answer = httpx.get(f"{scheme}://{t.host}:{t.port}/", verify=verify, timeout=TIMEOUT_S)
        after = dt.datetime.now(dt.UTC)
        server = parsedate_to_datetime(answer.headers["date"])
    except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
        return Finding(
            "clock", False, f"{t.host}:{t.port}: no HTTP answer with a date ({exc}); ask the operator"
        )
    # the header drops the fraction of its second: the server was, on average, half a second further on
    skew = (server - (before + (after - before) / 2)).total_seconds() + 0.5
    detail = f"this machine is {abs(skew):.0f} s {'behind' if skew > 0 else 'ahead of'} the server"
    if abs(skew) > SYSTEM_TIME_TOLERANCE:
        return Finding(
            "clock",
            False,
            f"{detail}; the server refuses signatures off by more than {SYSTEM_TIME_TOLERANCE} s: "
            "synchronise the clock (NTP: `timedatectl set-ntp true`)",
        )
    return Finding("clock", True, f"{detail} (1 s resolution; within {SYSTEM_TIME_TOLERANCE} s)")


def _registered(t: Target) -> Finding:
    import httpx
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.fleet_pb2 import ActivateNodeRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    assert t.key is not None and t.ca is not None
    try:
        private = load_ssh_private_key(t.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        return Finding("node key", False, f"{t.key}: unreadable ({exc}); see the key line above")
    public = private.public_key()
    client = FleetHttpClient.from_server_address(
        f"{t.host}:{t.port}",
        False,
        t.ca.read_bytes(),
        [NodeAuthHttpInterceptor(private, public)],  # type: ignore[arg-type]
    )
    probe = ActivateNodeRequest(public_key=public_key_to_bytes(public), heartbeat_interval=-1.0)  # type: ignore[arg-type]
    try:
        client.ActivateNode(probe)
        status = 200
    except httpx.HTTPStatusError as exc:
        status = exc.response.status_code
    except httpx.HTTPError as exc:
        return Finding("node key", False, f"the Fleet call failed ({exc}); ask the operator")
    if status == REGISTERED:
        return Finding("node key", True, f"{t.key.with_suffix('.pub').name} is registered with the server")
    if status == UNREGISTERED:
        return Finding(
            "node key",
            False,
            f"the server does not know this site's key: send {t.key.with_suffix('.pub')} to the operator, "
            "who runs `fedretina server add-site NAME FILE.pub`",
        )
    if status == 401:
        return Finding("node key", False, "the server refused the signature: check the clock line above")
    if status == 404:
        return Finding("node key", False, "no Fleet API at this address: is it the server's site address?")
    return Finding("node key", False, f"unexpected answer {status} to the Fleet call; ask the operator")


# ------------------------------------------------------------------------------------------ certificates
def _certificate(der: bytes | None) -> Certificate:
    from cryptography import x509

    assert der is not None
    return x509.load_der_x509_certificate(der)


def _certificate_file(path: Path) -> Certificate:
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes())


def _unverified(t: Target) -> Certificate:
    """The server's certificate as presented, not verified: only to name what it says in an error."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return _certificate(_handshake(t, context)[0])


def _handshake(t: Target, context: ssl.SSLContext) -> tuple[bytes | None, str | None]:
    """(the server's certificate, DER; the TLS version) of one handshake under `context`."""
    with (
        socket.create_connection((t.host, t.port), timeout=TIMEOUT_S) as raw,
        context.wrap_socket(raw, server_hostname=t.host) as tls,
    ):
        return tls.getpeercert(binary_form=True), tls.version()


def _names(cert: Certificate) -> list[str]:
    from shared.operations.certs import server_names

    return server_names(cert)
