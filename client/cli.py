"""`fedretina site ...`: what a hospital runs on its own machine. Nothing here sends anything anywhere."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from shared.errors import DataError

app = typer.Typer(help="Site (hospital) commands: validate local data.", no_args_is_help=True)


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
    from shared.data.site import load_site_config

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
