"""One federated run as the studies need it: a real `flwr run .` simulation of a scenario under an
experiment's settings, in the foreground, with a progress bar over the rounds the run store records.

`fedretina compare`'s federated arms and the pretraining study's federated SparK both run through here, so
a study's federated encoder is what `flwr run .` with the same settings would export."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from server.directory import FederationError
from server.store import StoreReader
from shared.config import ExperimentConfig, dump_config
from shared.logs import progress_bar
from shared.rundir import atomic_write_text
from simulation.flower_env import PROJECT_ROOT, flower_env, flwr_run_command, stop_local_superlink


def simulate(cfg: ExperimentConfig, scenario: Path, nodes: int, label: str) -> Path:
    """Run `scenario` (a YAML path) with `nodes` simulated sites under `cfg` (its seed, its name in its
    runs_dir) and return the run's federation folder once the run completed; raises FederationError
    (naming the log) otherwise. A run interrupted after its first checkpoint resumes from it; one
    interrupted earlier starts again."""
    folder = Path(cfg.runs_dir) / cfg.name
    folder.mkdir(parents=True, exist_ok=True)
    experiment = folder / "experiment.yaml"
    atomic_write_text(experiment, dump_config(cfg))
    home = Path(cfg.runs_dir) / ".flwr-home"
    stop_local_superlink(flower_env(home))  # an interrupted study's simulation may still be running
    federation = folder / "federation"
    resume = any((federation / "checkpoints").glob("*.safetensors"))
    if not resume:  # interrupted before its first checkpoint: nothing to keep
        shutil.rmtree(federation, ignore_errors=True)
    run_config = {
        "config": str(experiment.resolve()),
        "profile": cfg.profile,
        "scenario": str(scenario.resolve()),
        "run-name": cfg.name,
        "seed": cfg.seed,
        "resume": resume,
        "set": "",
    }
    env = {**os.environ, **flower_env(home)}
    total = cfg.federation.rounds_pretrain + cfg.federation.rounds_finetune
    log_path = folder / "flwr-run.log"
    store = federation / "store.sqlite"
    with log_path.open("a") as out, progress_bar(label, total, "round") as bar:
        process = subprocess.Popen(
            flwr_run_command(nodes, run_config),
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            while process.poll() is None:
                time.sleep(2)
                bar.update(rounds_done(store) - bar.n)
        finally:
            if process.poll() is None:
                process.terminate()
            process.wait()
            stop_local_superlink(flower_env(home))
    status = run_status(store)
    if process.returncode != 0 or status != "completed":
        raise FederationError(
            f"{label}: the federated run ended {status!r} (flwr run exit {process.returncode}); "
            f"its log: {log_path}"
        )
    return federation


def rounds_done(store: Path) -> int:
    return len(StoreReader(store).rounds(finished=True)) if store.is_file() else 0


def run_status(store: Path) -> str:
    run = StoreReader(store).run() if store.is_file() else None
    return str(run["status"]) if run else "missing"
