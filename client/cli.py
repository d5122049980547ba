"""`fedretina site ...`: what a hospital runs on its own machine. Only `serve` talks to the federation, and
it sends weights, counts and metrics only."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from shared.errors import DataError

app = typer.Typer(
    help="Site (hospital) commands: check local data, make keys, approve app versions, serve the site.",
    no_args_is_help=True,
)


@app.command("check")
def check(
    sites: Annotated[
        list[Path], typer.Argument(help="Site YAML file(s), e.g. sites/generated/eyepacs.yaml.")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Report folder (default: <state_dir>/check of each site)."),
    ] = None,
    workers: Annotated[int, typer.Option(help="Processes decoding images.")] = 2,
) -> None:
    """Validate a site's data and write its report (report.json, summary.txt, manifest.csv).

    Lists every problem against its file: undecodable, truncated or zero-byte images, duplicates, labels
    outside the task's range, conflicting grades for one eye, files the CSV names but that are missing, and
    image files it does not name. Recoverable problems exclude only that file; fatal ones (a CSV without its
    label column, too many exclusions) exit with code 3. Nothing is written outside the report folder.

    Example: fedretina site check sites/generated/eyepacs.yaml
    """
    from shared.data.checks import check_site
    from shared.data.site_config import load_site_config

    fatal: list[str] = []
    for path in sites:
        site = load_site_config(path)
        target = out / site.name if out and len(sites) > 1 else out
        result = check_site(site, target, workers)
        typer.echo(result.text)
        fatal += [f"{site.name}: {p.file}: {p.reason}" for p in result.fatal]
    for line in fatal:
        print(f"fedretina: error: {line}", file=sys.stderr)
    if fatal:
        raise typer.Exit(DataError.exit_code)


@app.command("keys")
def keys(
    site: Annotated[Path, typer.Argument(help="The site YAML.")],
    force: Annotated[bool, typer.Option(help="Replace the site's key pair (rotation).")] = False,
) -> None:
    """Make this site's key pair for node authentication, in its state folder (once; --force rotates it).

    The private key never leaves the site: send only the printed .pub file to the federation's operator,
    who registers it with `fedretina server add-site NAME FILE.pub`.

    Example: fedretina site keys /etc/fedretina/eyepacs.yaml
    """
    from client.daemon import site_keys
    from shared.data.site_config import load_site_config

    private, public = site_keys(load_site_config(site), force=force)
    typer.echo(f"private key (keep it here, secret): {private}")
    typer.echo(f"public key (send it to the operator): {public}")


@app.command("serve")
def serve(
    site: Annotated[Path, typer.Argument(help="The site YAML: the only data this node will read.")],
    superlink: Annotated[str, typer.Option(help="The server's address for sites, HOST:PORT.")],
    ca: Annotated[Path | None, typer.Option(help="The federation's CA certificate (ca.crt).")] = None,
    key: Annotated[Path | None, typer.Option(help="The site's private key (default: `site keys`').")] = None,
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="This node's local Runtime API port (one per site here).")
    ] = 9094,
    insecure: Annotated[
        bool, typer.Option(help="No TLS, no node authentication: closed test networks.")
    ] = False,
    foreground: Annotated[bool, typer.Option(help="Stay in the foreground (systemd).")] = False,
    checked: Annotated[bool, typer.Option(hidden=True)] = False,
) -> None:
    """Serve this site to the federation: check it, then run a Flower SuperNode for it until stopped.

    A site with fatal problems is refused. The node reconnects by itself after a server outage. Its log,
    pid and Flower's files go to <state_dir>/daemon/; nothing is written in the dataset.

    Example: fedretina site serve eyepacs.yaml --superlink fl.hospital.org:9092 --ca ca.crt
    """
    from client.daemon import serve_site
    from shared.data.site_config import load_site_config

    config = load_site_config(site)
    serve_site(
        config, superlink, ca, key, port=port, insecure=insecure, foreground=foreground, checked=checked
    )


@app.command("doctor")
def doctor(
    site: Annotated[Path, typer.Argument(help="The site YAML it would serve.")],
    superlink: Annotated[
        str | None, typer.Option(help="The server's address for sites, HOST:PORT (as for `serve`).")
    ] = None,
    ca: Annotated[Path | None, typer.Option(help="The federation's CA certificate (ca.crt).")] = None,
    key: Annotated[Path | None, typer.Option(help="The site's private key (default: `site keys`').")] = None,
    insecure: Annotated[
        bool, typer.Option(help="The server runs without TLS (closed test networks).")
    ] = False,
) -> None:
    """Can this site join the federation? One line per check, each OK or the problem and its fix.

    The site YAML and its dataset (`site check`'s verdict), the state folder, disk space, the key pair and
    its permissions, approved app versions, CPU/GPU/memory; then, with --superlink, DNS, a TCP connection,
    the TLS handshake against --ca with the server's name checked against its certificate, the certificate's
    expiry, the clock against the server's, and whether the server knows this site's key (a signed Fleet
    call that leaves the node offline). Exit code 0 only when the site can join. Sends no data.

    Example: fedretina site doctor eyepacs.yaml --superlink fl.hospital.org:9092 --ca ca.crt
    """
    from client.doctor import diagnose, report

    text, ready = report(diagnose(site, superlink, ca, key, insecure))
    typer.echo(text)
    if not ready:
        raise typer.Exit(1)


@app.command("stop")
def stop(site: Annotated[Path, typer.Argument(help="The site YAML it serves.")]) -> None:
    """Stop a site daemon started without --foreground.

    Example: fedretina site stop eyepacs.yaml
    """
    from client.daemon import SiteDaemon
    from shared.data.site_config import load_site_config
    from shared.operations.daemon import stop as stop_daemon

    folder = SiteDaemon.folder_of(load_site_config(site))
    stopped = stop_daemon(folder / "supernode.pid", folder)  # and anything a killed daemon left running
    typer.echo("stopped" if stopped else "no daemon was serving this site")


@app.command("approve")
def approve(
    site: Annotated[Path, typer.Argument(help="The site YAML.")],
    target: Annotated[
        str, typer.Argument(help="The reviewed app: its folder, a .fab bundle, or its 64-digit hash.")
    ],
) -> None:
    """Let this site run one app version (after reviewing it); runs of any other version are refused.

    The site log and `fedretina site approvals` show the hash of each refused version, whose bundle is kept
    in <state_dir>/apps/pending/ for review. Takes effect at the next message; no restart needed.

    Example: fedretina site approve eyepacs.yaml ./fedretina-1.2.0/
    """
    from client.approval import Approvals, app_hash
    from shared.data.site_config import load_site_config

    digest = app_hash(target)
    added = Approvals(load_site_config(site).state_root).approve(digest, target)
    typer.echo(f"{'approved' if added else 'already approved'}: {digest}")


@app.command("evaluate")
def evaluate(
    site: Annotated[Path, typer.Argument(help="The site YAML whose test patients score the model.")],
    model: Annotated[
        Path,
        typer.Option(
            "--model", "-m", help="A run's fine-tuned model: runs/<run>/federation/model.safetensors."
        ),
    ],
) -> None:
    """Score a fine-tuned model on this site's held-out test patients (its test split, which no training
    round reads): every task of the model the site holds, accuracy, AUC, kappa, weighted F1, and the
    headline AUC (referable-DR AUC for DR) with its bootstrap 95% interval. Reads the model and the site's
    images; writes nothing and sends nothing. The model carries its own settings.

    Example: fedretina site evaluate sites/generated/eyepacs.yaml -m runs/demo/federation/model.safetensors
    """
    from client.evaluate import evaluate_model, table
    from shared.data.site import load_site

    found = load_site(site)
    typer.echo(table(found, model, evaluate_model(found, model)))


@app.command("privacy")
def privacy(site: Annotated[Path, typer.Argument(help="The site YAML.")]) -> None:
    """Print this site's privacy ledger: every private run and phase it trained, the steps, the noise,
    the sample rate, and the epsilon it has spent against its own budget (`privacy:` in the YAML).

    Example: fedretina site privacy eyepacs.yaml
    """
    from client.privacy import ledger_report
    from shared.data.site_config import load_site_config

    typer.echo(ledger_report(load_site_config(site)))


@app.command("approvals")
def approvals(site: Annotated[Path, typer.Argument(help="The site YAML.")]) -> None:
    """List the app versions this site approved, and those it refused (pending review).

    Example: fedretina site approvals eyepacs.yaml
    """
    from client.approval import Approvals
    from shared.data.site_config import load_site_config

    listing = Approvals(load_site_config(site).state_root)
    for digest, note in listing.approved().items():
        typer.echo(f"approved  {digest}  {note}")
    for digest in listing.pending():
        typer.echo(f"refused   {digest}  review {listing.folder / 'pending' / (digest + '.fab')}")
