"""The pretraining study's federated arms: SparK pretrained by a real `flwr run .` simulation in which each of
`study.pretrain_sites` is one site, under one strategy's settings (`study.federated`), once per pretraining
seed, at the centralised pretraining's sample-gradient count, so that "federated − centralised SparK" is a
paired difference of two encoders that saw the same images, seed and compute.

Equal compute: by default a round is one local epoch and there are `pretrain.epochs` rounds, so the sites
together make the centralised run's passes over the pooled images. An arm that sets other
`federation.rounds_pretrain` (more, shorter rounds) makes each site take the local steps that keep the
count: pretrain.epochs x pooled images / (rounds x sites x batch), unless it names
`federation.local_steps`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from server.store import StoreReader
from shared.config import ExperimentConfig, override
from shared.data.site import load_site
from shared.errors import ConfigError
from shared.federation.wire import PRETRAIN
from shared.rundir import atomic_write_text
from shared.training.phase import Span
from simulation.simulate import simulate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FederatedSpark:
    """One federated pretraining: its init name, the centralised init it pairs with, its resolved settings
    and the sample-gradients it makes against the centralised run's."""

    arm: str  # its name in `study.federated`
    init: str
    counterpart: str
    cfg: ExperimentConfig
    sample_gradients: int
    centralised_sample_gradients: int

    @property
    def encoder(self) -> Path:
        return Path(self.cfg.runs_dir) / self.cfg.name / "federation" / "encoder.safetensors"


def plan_federated(cfg: ExperimentConfig) -> list[FederatedSpark]:
    """Every `study.federated` arm once per pretraining seed (`<name>-seed<k>`, paired with `spark-seed<k>`),
    or once with the experiment's seed (`<name>`, paired with `spark`)."""
    s = cfg.study
    if not s.federated:
        return []
    images = [len(load_site(p).rows) for p in s.pretrain_sites]
    seeds = s.pretrain_seeds or (cfg.seed,)
    runs = []
    for name, overrides in s.federated.items():
        if name.startswith(("scratch", "spark-seed")) or name in ("spark", *s.encoders):
            raise ConfigError(f"study.federated.{name}: the name is taken; name the arm otherwise")
        for k in seeds:
            suffix = f"-seed{k}" if s.pretrain_seeds else ""
            run = _settings(cfg, f"{name}{suffix}", k, overrides, images, f"study.federated.{name}")
            f = run.federation
            per_round = f.local_steps * run.pretrain.batch_size * len(images) or f.local_epochs * sum(images)
            runs.append(
                FederatedSpark(
                    arm=name,
                    init=f"{name}{suffix}",
                    counterpart=f"spark{suffix}",
                    cfg=run,
                    sample_gradients=f.rounds_pretrain * per_round,
                    centralised_sample_gradients=cfg.pretrain.epochs * sum(images),
                )
            )
    return runs


def _settings(
    cfg: ExperimentConfig, init: str, seed: int, overrides: dict, images: list[int], source: str
) -> ExperimentConfig:
    """The federated run's settings: pretraining only, the study's SparK settings, the arm's overrides, and
    local steps for equal compute when its rounds are not the centralised epochs."""
    epochs = cfg.pretrain.epochs
    base = cfg.model_copy(
        update={
            "seed": seed,
            "name": init,
            "runs_dir": str((Path(cfg.runs_dir) / cfg.name).resolve()),
            "pretrain": cfg.pretrain.model_copy(update={"method": "spark"}),
            "federation": cfg.federation.model_copy(
                update={
                    "tasks": (),
                    "rounds_pretrain": epochs,
                    "rounds_finetune": 0,
                    "local_epochs": 1,
                    "local_steps": 0,
                }
            ),
        }
    )
    run = override(base, overrides, source)
    f = run.federation
    if "federation.local_steps" in overrides or f.rounds_pretrain * f.local_epochs == epochs:
        return run
    steps = Span.equal_compute_steps(epochs, images, f.rounds_pretrain, run.pretrain.batch_size)
    return run.model_copy(update={"federation": f.model_copy(update={"local_steps": steps})})


def federated_encoder(run: FederatedSpark) -> Path:
    """The arm's encoder export: simulated here unless a finished run left it (an interrupted one resumes
    from its last checkpoint)."""
    if run.encoder.is_file():
        log.info("federated SparK %s already pretrained: %s", run.init, run.encoder)
        return run.encoder
    folder = Path(run.cfg.runs_dir) / run.cfg.name
    folder.mkdir(parents=True, exist_ok=True)
    scenario = folder / "scenario.yaml"
    sites = [str(Path(p).resolve()) for p in run.cfg.study.pretrain_sites]
    description = f"the pretraining study's unlabelled sites, one simulated site each ({run.init})"
    plan = {"name": run.init, "description": description, "sites": sites}
    atomic_write_text(scenario, yaml.safe_dump(plan))
    simulate(run.cfg, scenario, len(sites), f"federated SparK {run.init}")
    return run.encoder


def compute_line(run: FederatedSpark) -> str:
    """What the arm ran, for the study's table: rounds, local work, its sample-gradients against the
    centralised run's, and (from its run store) the bytes the sites uploaded per round and its wall-clock."""
    f = run.cfg.federation
    local = f.local_work(PRETRAIN)
    line = (
        f"{run.init}: {f.strategy}, {_count(f.rounds_pretrain, 'round')} of {local}, "
        f"{run.sample_gradients:,} sample-gradients (centralised {run.centralised_sample_gradients:,})"
    )
    store = run.encoder.parent / "store.sqlite"
    if not store.is_file():
        return line
    reader = StoreReader(store)
    uploaded = sum(int(r["bytes"] or 0) for r in reader.replies(kind="train"))
    rounds = max(1, len(reader.rounds(finished=True)))
    times = reader.run() or {}
    wall = (times.get("finished") or 0) - (times.get("started") or 0)
    return f"{line}, {uploaded / rounds / 1e6:.1f} MB uploaded per round, {wall / 60:.1f} min"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"
