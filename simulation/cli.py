"""`fedretina`: the one command-line entry point. It mounts each folder's sub-commands and holds none itself
beyond `config`; every command parses its options, calls one library function and prints the result."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from client.cli import app as site_app
from server.cli import app as server_app
from server.cli import certs_app
from shared.cli_common import ConfigOpt, ProfileOpt, SetOpt, print_report, resolve_config, run_cli, with_sites
from shared.config import dump_config
from shared.logs import setup_logging
from simulation.analysis.cli import app as analyze_app

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
    rich_markup_mode="markdown",
)


app.add_typer(site_app, name="site")
app.add_typer(server_app, name="server")
app.add_typer(certs_app, name="certs")
study_app = typer.Typer(help="Studies that answer one question end to end.", no_args_is_help=True)
app.add_typer(study_app, name="study")
app.add_typer(analyze_app, name="analyze")
export_app = typer.Typer(help="Copy a finished run's record to other tools.", no_args_is_help=True)
app.add_typer(export_app, name="export")


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


@contextmanager
def resumable(command: str, again: str) -> Iterator[None]:
    """A long job stopped by Ctrl-C or SIGTERM (a scheduler's, systemd's) ends in one line saying how to
    continue it, exit 130; what it finished is kept (each job checkpoints as it goes)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt:
        typer.echo(f"{command}: interrupted; {again}", err=True)
        raise typer.Exit(130) from None


WITH_RESUME = "run the same command with --resume to continue"


@app.command("synth")
def synth(
    profile: ProfileOpt = None,
    data_dir: Annotated[Path, typer.Option(help="Where the datasets are written.")] = Path("data/synth"),
    sites_dir: Annotated[Path, typer.Option(help="Where the site YAMLs are written.")] = Path(
        "sites/generated"
    ),
    seed: Annotated[int, typer.Option(help="Dataset seed (same seed, same bytes).")] = 0,
    workers: Annotated[int, typer.Option(help="Rendering processes.")] = 2,
    only: Annotated[list[str] | None, typer.Option(help="Only these sites (repeatable).")] = None,
) -> None:
    """Render synthetic fundus datasets in the real datasets' layouts, and their site YAMLs.

    The profile sets the size: tiny (tests, ~100 images), cpu (the demo: an EyePACS-like DR site and its
    unlabelled pool, an MMAC-like myopia site, two UK Biobank-like shards, an IDRiD-like lesion-mask set, a
    Messidor-2-like external test site; ~3,000 images), paper. `--only eyepacs-test` adds 625 held-out
    EyePACS-like patients (998 test images at cpu) that `compare.test_sites` scores arms on.
    Sites already written with the same plan and seed are kept.

    Example: fedretina synth --profile cpu && fedretina site check sites/generated/*.yaml
    """
    from shared.data.synth.catalogue import synthesize

    for path in synthesize(profile or "cpu", data_dir, sites_dir, seed, workers, tuple(only or ())):
        typer.echo(path)


@app.command("pretrain")
def pretrain(
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    overrides: SetOpt = None,
    site: Annotated[
        list[Path] | None, typer.Option(help="Site YAML to train on (repeatable; adds to config).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Run name: outputs go to runs/NAME/pretrain/.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run's last checkpoint.")] = False,
) -> None:
    """Pretrain the encoder on one or more sites' images, centralised: SparK masked modelling (default) or
    MoCo v2 (`--set pretrain.method=moco`); or, with `--set pretrain.method=natural` and no site, supervised
    on scikit-image's natural photographs (the offline stand-in for ImageNet weights).

    Writes runs/NAME/pretrain/: checkpoint.safetensors (resumable with --resume, which refuses changed
    settings by name), previews/epoch*.png (input, masked input, reconstruction; SparK), history.csv and
    loss.png, and encoder.safetensors, the initialisation `fedretina finetune` takes. One simulated
    federated site holding these images reproduces it bitwise. With `--set privacy.enabled=true` it trains
    with DP-SGD within privacy.target_epsilon (ledger: privacy-ledger.jsonl; docs/privacy.md).

    Example: fedretina pretrain --profile tiny --site sites/generated/ukb-a.yaml --name spark-tiny
    """
    from simulation.centralised.pretrain import run_pretraining

    cfg = with_sites(resolve_config(config, profile, overrides), site, name)
    with resumable("pretrain", WITH_RESUME):
        outputs = run_pretraining(cfg, resume=resume)
    typer.echo(f"encoder: {outputs.encoder}")
    typer.echo(f"loss by epoch: {', '.join(f'{x:.4f}' for x in outputs.losses)}")


@app.command("finetune")
def finetune(
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    overrides: SetOpt = None,
    site: Annotated[
        list[Path] | None, typer.Option(help="Site YAML holding the task's labels (repeatable).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Run name: outputs go to runs/NAME/finetune/.")] = None,
    resume: Annotated[bool, typer.Option(help="Skip the folds already finished in this run.")] = False,
) -> None:
    """Fine-tune and evaluate, for every configured initialisation (finetune.inits: scratch, spark, moco,
    imagenet) and label fraction: by patient-grouped, stratified k-fold CV (finetune.protocol=cv, the
    default), or by the federation's own per-site split, centralised (finetune.protocol=holdout).

    CV selects each fold's epoch on an inner validation split only; a site's own test split is scored by
    every model with bootstrap 95% CIs. Writes runs/NAME/finetune/: folds.csv, summary.json, table.md, ROC,
    confusion-matrix and AUC-vs-label-fraction PNGs, each model (safetensors), its per-epoch history (csv)
    and predictions (npz). --resume skips finished arms (and may add inits, fractions or folds). With
    `--set privacy.enabled=true` each model trains with DP-SGD and the table gains its epsilon.

    Example: fedretina finetune -c experiment.yaml --set finetune.label_fractions=[0.1]
    """
    from simulation.centralised.finetune import run_finetuning

    cfg = with_sites(resolve_config(config, profile, overrides), site, name)
    with resumable("finetune", WITH_RESUME):
        print_report(run_finetuning(cfg, resume=resume))


@study_app.command("pretraining")
def pretraining_study(
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    overrides: SetOpt = None,
    name: Annotated[str | None, typer.Option(help="Run name: outputs go to runs/NAME/study/.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the pretraining and skip finished arms.")] = False,
) -> None:
    """Does SparK pretraining on unlabelled images make a few labels go further? SparK on
    study.pretrain_sites (with a linear-probe curve over its epochs; once per study.pretrain_seeds), federated
    SparK over the same sites as `flwr run .` simulations (study.federated, at equal compute), then {scratch,
    spark, federated, study.encoders} x study.label_counts x study.seeds fine-tuned on the labelled sites,
    paired, scored on their test split (and study.test_sites'), with paired bootstrap 95% intervals of each
    difference. Writes runs/NAME/study/ (table.md, differences.csv, arms.csv, probe.csv, PNGs).
    docs/finetuning.md explains the protocol.

    Example: fedretina study pretraining -c simulation/studies/pretraining.yaml --name pretraining-study
    """
    from simulation.studies.pretraining import run_pretraining_study

    cfg = with_sites(resolve_config(config, profile, overrides), None, name)
    with resumable("study pretraining", WITH_RESUME):
        print_report(run_pretraining_study(cfg, resume=resume))


@study_app.command("seed2")
def seed2_study(
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    overrides: SetOpt = None,
    name: Annotated[str | None, typer.Option(help="Run name: outputs go to runs/NAME/seed2/.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the pretrainings and skip finished arms.")] = False,
) -> None:
    """The second seed's study (Srinivasan et al. 2022) plus SparK: per architecture (study.archs), IWNE-FS,
    IWNE-CL (MoCo v2 on study.pretrain_sites), IFI-FS (study.imagenet weights, or the natural-photo stand-in
    where none are given), IFI-CL (MoCo from that start) and SparK, x finetune.label_fractions x study.seeds,
    paired; scored on the labelled sites' test split and on study.external_sites, referable DR both by
    summed probabilities and by the paper's summed logits. Writes runs/NAME/seed2/ (table.md, arms.csv,
    differences.csv, AUC-vs-fraction PNGs). docs/analysis.md explains it.

    Example: fedretina study seed2 -c simulation/studies/seed2.yaml --name seed2
    """
    from simulation.studies.seed2 import run_seed2_study

    cfg = with_sites(resolve_config(config, profile, overrides), None, name)
    with resumable("study seed2", WITH_RESUME):
        print_report(run_seed2_study(cfg, resume=resume))


@app.command("compare")
def compare(
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    overrides: SetOpt = None,
    name: Annotated[str | None, typer.Option(help="Run name: the report goes to runs/NAME/compare/.")] = None,
) -> None:
    """Does federated training match pooling the data? Per scenario (compare.scenarios) and seed: the
    centralised arm (the scenario's sites pooled), each site alone (compare.local) and every federated
    strategy (compare.strategies; real `flwr run .` simulations), at equal sample-gradient steps, all
    scored on the same test images. Both phases (compare.pretrain) or fine-tuning only.

    Writes runs/NAME/compare/: report.html and report.md (mean and 95% CI per arm, each arm minus
    centralised with a paired bootstrap CI and a verdict against compare.margin, each site's own test
    images, learning curves on an equal-compute axis, label mix, bytes, wall-clock, epsilon, versions),
    results.csv (arm, scenario, seed, site, metric, value) and differences.csv. Arms live under
    runs/arms/ named by their settings: a finished arm is reused by any comparison that asks for it, so
    running the same command again after an interruption continues where it stopped.

    Example: fedretina compare -c simulation/studies/compare.yaml --name compare
    """
    from simulation.compare.run import run_compare

    cfg = with_sites(resolve_config(config, profile, overrides), None, name)
    # the running simulation is stopped with it, finished arms are kept
    with resumable("compare", "run the same command again to continue"):
        outputs = run_compare(cfg)
    shown = outputs.differences[["scenario", "arm", "referable_auc", "kappa", "verdict"]]
    typer.echo(shown.to_string(index=False, float_format=lambda v: f"{v:+.3f}"))
    typer.echo(f"report: {outputs.directory / 'report.html'}")


@app.command("probe")
def probe(
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    overrides: SetOpt = None,
    site: Annotated[
        list[Path] | None, typer.Option(help="Site YAML holding the task's labels (repeatable).")
    ] = None,
    encoder: Annotated[
        Path | None,
        typer.Option(help="Encoder export (SparK or MoCo); absent: a random encoder, the reference."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Run name: outputs go to runs/NAME/probe/.")] = None,
) -> None:
    """Linear probe of a frozen encoder: its globally pooled last feature map, read out by a logistic
    regression fitted on each site's fine-tuning training images (finetune.task) and scored on the sites'
    own test splits. Cheaper than fine-tuning, and it measures the encoder alone.

    Writes runs/NAME/probe/probe.json (the metrics, the encoder, the image counts) and the config and log.

    Example: fedretina probe -c experiment.yaml --encoder runs/spark-tiny/pretrain/encoder.safetensors
    """
    from shared.rundir import run_dir
    from shared.training.linear_probe import PART, run_probe

    cfg = with_sites(resolve_config(config, profile, overrides), site, name)
    record = run_probe(cfg, encoder)
    for key, value in record["metrics"].items():
        typer.echo(f"{key:<22} {value:.4f}")
    typer.echo(f"results: {run_dir(cfg, PART) / 'probe.json'}")


@app.command("env")
def flower_environment(
    stop: Annotated[
        bool, typer.Option("--stop", help="Stop this project's local SuperLink instead.")
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Attach simulations to this running Ray cluster (HOST:PORT of `ray start --head`); "
            "docs/scale.md has the recipe."
        ),
    ] = None,
) -> None:
    """Print the environment for Flower commands, to `eval` in your shell before typing `flwr run .`.

    With --ray-address the simulation's actors run on that Ray cluster's nodes; a local SuperLink already
    running (started without it) is stopped, so the next `flwr run` starts one that attaches.

    Example: eval "$(uv run fedretina env)" && uv run flwr run . --stream
    """
    from simulation.flower_env import flower_env, shell_exports, stop_local_superlink

    env = flower_env(ray_address=ray_address)
    if stop:
        typer.echo("stopped" if stop_local_superlink(env) else "no local SuperLink was running")
        return
    if ray_address and stop_local_superlink(env):
        typer.echo("stopped the local SuperLink: the next flwr run starts one attached to Ray", err=True)
    typer.echo(shell_exports(env))


@app.command("dashboard")
def dashboard(
    runs: Annotated[Path, typer.Argument(help="The runs folder (every run store under it is shown).")] = Path(
        "runs"
    ),
    host: Annotated[str, typer.Option(help="Address to bind; beyond loopback a --token is required.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 8050,
    token: Annotated[
        str | None, typer.Option(help="Token every request must carry; 'generate' makes and prints one.")
    ] = None,
) -> None:
    """Serve the operator's dashboard: every run under RUNS (runs table, a run's progress, curves,
    participation grid, drift, bytes, stragglers, probes, events, DP epsilon; runs compared), read-only
    (a live run is never blocked), refreshing itself while a run is going.

    Example: fedretina dashboard runs/   then open http://127.0.0.1:8050/
    """
    from server.dashboard.serve import serve

    serve(runs, host, port, token)


@export_app.command("mlflow")
def export_mlflow(
    run: Annotated[Path, typer.Argument(help="The run's folder: runs/<run> (or runs/<run>/federation).")],
    uri: Annotated[
        str | None,
        typer.Option(
            help="MLflow tracking URI (default: the run's tracking.mlflow_uri): http://host:5000, "
            "sqlite:////abs/mlflow.db, or a file name under the runs folder."
        ),
    ] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment (default: the run's).")] = None,
) -> None:
    """Log a federated run to MLflow: its config as parameters, every round's global and per-site metrics
    (step = round), the final test per site, summary.md and the model. What a live run (tracking.mlflow_uri)
    already logged is not logged twice.

    Example: fedretina export mlflow runs/demo --uri http://127.0.0.1:5000
    """
    import json

    from server.store import StoreReader
    from server.tracking import sync, tracking_uri
    from shared.errors import ConfigError

    folder = run / "federation" if (run / "federation" / "store.sqlite").exists() else run
    if not (folder / "store.sqlite").exists():
        raise ConfigError(f"{run}: no store.sqlite here or in federation/; give a federated run's folder")
    info = StoreReader(folder / "store.sqlite").run() or {}
    tracking = json.loads(info.get("config") or "{}").get("tracking", {})
    chosen = uri or tracking.get("mlflow_uri") or ""
    if not chosen:
        raise ConfigError("--uri: the run names no tracking.mlflow_uri; give one, e.g. --uri mlflow.db")
    target = tracking_uri(chosen, folder.parent.parent)
    run_id = sync(folder, target, experiment or tracking.get("experiment") or "fedretina")
    typer.echo(f"{folder.parent.name} -> MLflow run {run_id} at {target}")


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
