"""`fedretina server ...`: what the coordinator runs besides `flwr run` (reading a run's store)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shared.errors import UserError

app = typer.Typer(help="Server commands: inspect federated runs.", no_args_is_help=True)


@app.command("summary")
def summary(
    run: Annotated[Path, typer.Argument(help="A run folder, e.g. runs/demo-20261123-150000.")],
) -> None:
    """Print a federated run's per-round table of both phases, its status and where its outputs are.

    Exits with code 1 unless the run completed.

    Example: fedretina server summary runs/demo-20261123-150000
    """
    from server.report import summary_table
    from server.store import RunStore

    path = run / "federation" / "store.sqlite"
    if not path.is_file():
        raise UserError(f"{run}: no run store at {path}; is this a federated run folder?")
    store = RunStore(path, run.name)
    status = store.query("SELECT status FROM runs WHERE run_name = ?", (run.name,))
    typer.echo(summary_table(store))
    for row in store.query(
        "SELECT level, kind, message FROM events WHERE run_name = ? AND level != 'info'", (run.name,)
    ):
        typer.echo(f"{row['level']}: {row['kind']}: {row['message']}")
    state = status[0]["status"] if status else "unknown"
    typer.echo(f"run {run.name}: {state}")
    typer.echo(f"run store: {path}")
    for name in ("encoder.safetensors", "model.safetensors", "probes", "checkpoints"):
        if (run / "federation" / name).exists():
            typer.echo(f"  {run / 'federation' / name}")
    if state != "completed":
        raise typer.Exit(1)
