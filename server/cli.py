"""`fedretina server ...` and `fedretina certs ...`: what the federation's operator runs: the server (a
SuperLink behind a Fleet-only proxy, TLS and node authentication on by default), its sites' registration,
federated runs against it, and reading a run's store."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from shared.errors import UserError

app = typer.Typer(
    help="Server commands: start the server, register sites, run, inspect runs.", no_args_is_help=True
)
certs_app = typer.Typer(help="The federation's CA, server certificate and site keys.", no_args_is_help=True)
StateOpt = Annotated[Path, typer.Option("--state", help="The server's folder (state, logs, runs).")]
DEFAULT_STATE = Path("fedretina-server")


@certs_app.command("create")
def certs_create(
    out: Annotated[Path, typer.Option("--out", "-o", help="The bundle's folder.")] = Path("certs"),
    san: Annotated[
        list[str] | None, typer.Option(help="A DNS name or IP the server is reached at (repeat).")
    ] = None,
    site: Annotated[list[str] | None, typer.Option(help="Make a key pair for this site (repeat).")] = None,
    force: Annotated[bool, typer.Option(help="Replace existing files (a new CA too).")] = False,
) -> None:
    """Make the federation's CA, the server certificate for the given names, and site key pairs.

    Secret files (ca.key, server.key, sites/*.key) are written 0600 and never overwritten without --force.
    Sites can make their own key pair instead (`fedretina site keys`), so their private key never travels.

    Example: fedretina certs create --out certs --san fl.hospital.org --san 127.0.0.1 --site eyepacs
    """
    from shared.operations.certs import create_bundle

    for path in create_bundle(out, san or [], site or [], force=force):
        typer.echo(path)


@certs_app.command("check")
def certs_check(
    bundle: Annotated[Path, typer.Argument(help="The bundle's folder.")] = Path("certs"),
    host: Annotated[
        str | None, typer.Option(help="A name or IP the server certificate must be valid for.")
    ] = None,
) -> None:
    """Say what is wrong with a bundle, one line each (expired, wrong SAN, key/cert mismatch, loose modes).

    Example: fedretina certs check certs --host fl.hospital.org
    """
    from shared.operations.certs import check_bundle

    problems = check_bundle(bundle, host)
    for line in problems:
        print(f"fedretina: error: {line}", file=sys.stderr)
    if problems:
        raise typer.Exit(2)
    typer.echo(f"{bundle}: sound")


@app.command("start")
def start(
    certs: Annotated[Path | None, typer.Option(help="The bundle (`fedretina certs create`).")] = None,
    state: StateOpt = DEFAULT_STATE,
    listen: Annotated[str, typer.Option(help="Where sites connect (the proxy): HOST:PORT.")] = "0.0.0.0:9092",
    link_port: Annotated[
        int, typer.Option(min=1, max=65535, help="The SuperLink's own port, on 127.0.0.1 only.")
    ] = 9093,
    insecure: Annotated[
        bool, typer.Option(help="No TLS, no node authentication: for a closed test network.")
    ] = False,
    foreground: Annotated[bool, typer.Option(help="Stay in the foreground (systemd).")] = False,
) -> None:
    """Start the federation server: the SuperLink on loopback with TLS, node authentication and its state on
    disk, behind nginx, which shows the sites the Fleet API only (the Control API, which launches runs and
    registers keys, stays on loopback).

    Example: fedretina server start --certs certs --listen 0.0.0.0:9092
    """
    from server.deploy import start_server

    start_server(_settings(certs, state, listen, link_port, insecure), foreground=foreground)


@app.command("stop")
def stop(state: StateOpt = DEFAULT_STATE) -> None:
    """Stop a server started without --foreground.

    Example: fedretina server stop --state fedretina-server
    """
    from shared.operations.daemon import stop as stop_daemon

    stopped = stop_daemon(state / "server.pid", state.resolve())  # and anything a killed one left running
    typer.echo("stopped" if stopped else f"no server was running from {state}")


@app.command("add-site")
def add_site(
    name: Annotated[str, typer.Argument(help="The site's name (as in its site YAML).")],
    public_key: Annotated[
        Path, typer.Argument(help="The site's public key (its `fedretina site keys` .pub).")
    ],
    state: StateOpt = DEFAULT_STATE,
) -> None:
    """Register a site's public key: only registered sites may join, and each keeps its node id.

    Example: fedretina server add-site eyepacs eyepacs.pub
    """
    from server.deploy import ServerSettings, register_site

    node = register_site(ServerSettings.load(state), name, public_key)
    typer.echo(f"site {name} registered as node {node}")


@app.command("sites")
def sites(state: StateOpt = DEFAULT_STATE) -> None:
    """List the registered sites and whether they are online.

    Example: fedretina server sites
    """
    from server.deploy import ServerSettings, registered_sites

    for name, node, status in registered_sites(ServerSettings.load(state)):
        typer.echo(f"{name:<24} node {node:<22} {status}")


@app.command("run")
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="The experiment YAML.")],
    state: StateOpt = DEFAULT_STATE,
    name: Annotated[str, typer.Option(help="Run name: outputs in <state>/runs/NAME/.")] = "run",
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override one key (repeat).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run's last checkpoint.")] = False,
    app_dir: Annotated[
        Path | None,
        typer.Option(
            "--app",
            help="The app folder to send (default: this installation's); sites run only "
            "versions they approved.",
        ),
    ] = None,
) -> None:
    """Run both phases on the sites connected to this server (each site's data from its own node config).

    Exits 1 unless the run completed. Example: fedretina server run -c experiment.yaml --name first
    """
    from server.deploy import CONNECTION, ServerSettings, flwr, site_names
    from shared.operations.daemon import APP_ROOT

    settings = ServerSettings.load(state)
    if not config.is_file():
        raise UserError(f"{config}: no such experiment YAML")
    registered = len(site_names(settings))
    runs = shlex.quote(str((state / "runs").resolve()))
    sets = " ".join([f"runs_dir={runs}", f"federation.expected_sites={registered}", *(overrides or [])])
    run_config = (
        f'config="{config.resolve()}" scenario="" run-name="{name}" resume={str(resume).lower()} set="{sets}"'
    )
    app = (app_dir or APP_ROOT).resolve()
    if not (app / "pyproject.toml").is_file():
        raise UserError(f"--app: {app} holds no pyproject.toml; give the app's folder")
    flwr(settings, "run", str(app), CONNECTION, "--stream", "--run-config", run_config, stream=True)
    summary(state / "runs" / name)


def _settings(certs: Path | None, state: Path, listen: str, link_port: int, insecure: bool):
    from server.deploy import ServerSettings

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"--listen: {listen!r} is not HOST:PORT (a port 1..65535), e.g. 0.0.0.0:9092")
    if (certs is None) != insecure:
        raise UserError(
            "--certs: give the bundle (`fedretina certs create`), or --insecure for a closed test network"
        )
    return ServerSettings(state.resolve(), certs.resolve() if certs else None, host, int(port), link_port)


@app.command("summary")
def summary(
    run: Annotated[Path, typer.Argument(help="A run folder, e.g. runs/demo-20261123-150000.")],
    table: Annotated[
        bool, typer.Option(help="Print the per-round table (--no-table: after `flwr run`, which printed it).")
    ] = True,
) -> None:
    """Print a federated run's per-round table of both phases, its status and where its outputs are.

    Exits with code 1 unless the run completed (`flwr run` exits 0 whatever became of the run).

    Example: fedretina server summary runs/demo-20261123-150000
    """
    from server.report import summary_table
    from server.store import StoreError, StoreReader

    path = run / "federation" / "store.sqlite"
    store = StoreReader(path)
    recorded = store.run()
    if recorded is None:
        raise StoreError(f"{path}: records no run; is this a federated run's store, or a damaged one?")
    if table:
        typer.echo(summary_table(store))
    for row in store.events():
        if row["level"] != "info":
            typer.echo(f"{row['level']}: {row['kind']}: {row['message']}")
    state = recorded["status"]
    typer.echo(f"run {run.name}: {state}")
    typer.echo(f"run store: {path}")
    for name in ("encoder.safetensors", "model.safetensors", "probes", "checkpoints"):
        if (run / "federation" / name).exists():
            typer.echo(f"  {run / 'federation' / name}")
    if state != "completed":
        raise UserError(f"run {run.name} did not complete (its store says {state!r}); its events are above")
