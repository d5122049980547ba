"""`fedretina`: the one command-line entry point. It mounts each folder's sub-commands and holds none itself
beyond `config`; every command parses its options, calls one library function and prints the result."""

from __future__ import annotations

from typing import Annotated

import typer

from shared.cli_common import ConfigOpt, ProfileOpt, SetOpt, resolve_config, run_cli
from shared.config import dump_config
from shared.logs import setup_logging

app = typer.Typer(
    name="fedretina",
    help=(
        "Federated SparK pretraining and fine-tuning of nn-MobileNet on retinal fundus images.\n\n"
        "Site images never leave the site: only weights, counts and metrics travel.\n\n"
        "Start with `make demo`, or: fedretina synth && fedretina site check sites/generated/eyepacs.yaml"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _global(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv: all).")
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
) -> None:
    setup_logging(-1 if quiet else verbose)


@app.command("config")
def show_config(config: ConfigOpt = None, profile: ProfileOpt = None, overrides: SetOpt = None) -> None:
    """Print the resolved configuration (profile, then YAML, then --set overrides) as YAML.

    Example: fedretina config --profile tiny --set pretrain.epochs=3
    """
    typer.echo(dump_config(resolve_config(config, profile, overrides)), nl=False)


@app.command("env")
def flower_environment(
    stop: Annotated[
        bool, typer.Option("--stop", help="Stop this project's local SuperLink instead.")
    ] = False,
) -> None:
    """Print the environment for Flower commands, to `eval` in your shell before typing `flwr run .`.

    Example: eval "$(uv run fedretina env)" && uv run flwr run . --stream
    """
    from simulation.flower_env import flower_env, shell_exports, stop_local_superlink

    if stop:
        typer.echo("stopped" if stop_local_superlink(flower_env()) else "no local SuperLink was running")
    else:
        typer.echo(shell_exports(flower_env()))


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
