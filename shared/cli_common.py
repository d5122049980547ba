"""Pieces every `fedretina` sub-command shares: the config options and the one-line error exit.

Kept free of torch and flwr imports so `fedretina --help` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import click
import typer

from shared.config import ExperimentConfig, load_config, parse_overrides
from shared.errors import ConfigError, UserError
from shared.names import check_run_name
from shared.rundir import Report, private_files

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Experiment YAML; its `profile:` key picks the base profile."),
]
ProfileOpt = Annotated[
    str | None, typer.Option("--profile", "-p", help="tiny (tests), cpu (laptop demo) or paper (GPU).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one key, e.g. --set pretrain.epochs=3 (repeatable)."),
]


def resolve_config(config: Path | None, profile: str | None, overrides: list[str] | None) -> ExperimentConfig:
    """Profile + YAML + overrides, validated; errors surface as `ConfigError` (exit code 2)."""
    return load_config(config, profile=profile, overrides=parse_overrides(overrides or []))


def with_sites(cfg: ExperimentConfig, sites: list[Path] | None, name: str | None) -> ExperimentConfig:
    """Add command-line site YAMLs (after the config's own) and set the run name."""
    update: dict[str, object] = {}
    if sites:
        update["sites"] = tuple(dict.fromkeys([*cfg.sites, *(str(s.resolve()) for s in sites)]))
    if name:
        try:
            update["name"] = check_run_name(name)
        except ValueError as exc:
            raise ConfigError(f"--name: {exc}") from None
    return cfg.model_copy(update=update)


def print_report(report: Report) -> None:
    """What every reporting command prints last: its table, and where its results are."""
    typer.echo(report.table)
    typer.echo(f"results: {report.directory}")


def run_cli(app: typer.Typer, prog: str = "fedretina", args: list[str] | None = None) -> None:
    """Run a typer app; a `UserError` prints `prog: error: <one line>` to stderr and exits with its code, and
    so does a command line click refuses (an unknown option, a port out of range: exit 2, with the
    command's --help named)."""
    private_files()
    try:
        code = app(args=args, prog_name=prog, standalone_mode=False)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        if exc.format_message():  # (a group called bare has printed its help already)
            where = exc.ctx.command_path if exc.ctx is not None else prog
            print(f"{prog}: error: {exc.format_message()} (see `{where} --help`)", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        print(f"{prog}: aborted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
