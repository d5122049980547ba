"""The compared arms, each trained once: centralised (the scenario's sites pooled), local (one site alone) and
federated (a real `flwr run .` simulation of the scenario with one strategy's settings).

Equal compute: a federated round is one local epoch at every site, so R rounds make R passes over the pooled
training images; the centralised arm trains R epochs over them, and each local arm R epochs over its own
(together the same sample-gradient steps as one pooled run). Pretraining, when compared, follows the same
rule. A strategy that names other rounds for a phase keeps that compute with local steps (`_equal_compute`).

An arm's identity is a digest of everything that shapes it (its kind, the resolved settings, the scenario
and its sites' YAMLs, the part a local arm holds), and its folder is `<runs_dir>/arms/<kind>-<digest>/`.
`arm.json` (what the report needs: predictions aside) and `test.npz` (every scenario test image's labels,
probabilities and logits, with its site) are written last, atomically: an arm whose `arm.json` exists is
finished and is reused by any comparison asking for the same settings; an interrupted one is continued
(centralised and local) or started again (federated). A FedBN arm is scored as FedBN is used: each site's
test images with that site's own BatchNorm, from the site's state folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from client.state import own_batchnorm, state_dir
from server.store import StoreReader
from shared.config import ExperimentConfig, InitConfig, dump_config, override
from shared.data.labels import label_column
from shared.data.manifest import labelled, task_classes
from shared.data.scenario import Scenario, load_scenario, scenario_path, scenario_sites
from shared.data.site import Site, load_site
from shared.errors import ConfigError
from shared.federation.strategies import strategy_of
from shared.federation.wire import EPSILON, FINETUNE
from shared.rundir import atomic_write_text, save_arrays
from shared.training.data import site_images
from shared.training.finetune import build_task_model, finetune_split, predict_logits, site_test_rows, softmax
from shared.training.initialisation import read_encoder_export
from shared.training.phase import Span
from shared.weights import load_weights
from simulation.centralised.finetune import run_finetuning
from simulation.centralised.pretrain import run_pretraining
from simulation.simulate import simulate

log = logging.getLogger(__name__)
CENTRALISED, LOCAL, FEDERATED = "centralised", "local", "federated"
ARM_JSON, TEST_NPZ = "arm.json", "test.npz"
START = "start"  # the fine-tuning init's name in centralised and local runs
CURVE_KEYS = ("referable_auc", "kappa", "auc")  # validation metrics per round / epoch
STEP_KEYS = ("federation.local_steps", "federation.local_steps_finetune")  # compare derives them


@dataclass(frozen=True)
class CompareArm:
    """One trained model of a comparison: `kind`, its `label` in tables (centralised, local:<site>, or the
    strategy's name), the scenario it belongs to and the seed, with its resolved settings."""

    kind: str
    label: str
    scenario: str
    seed: int
    cfg: ExperimentConfig
    part: int = -1  # local: which of the scenario's sites

    @property
    def folder(self) -> Path:
        return Path(self.cfg.runs_dir) / self.cfg.name


def plan_arms(cfg: ExperimentConfig) -> list[CompareArm]:
    """Every arm of `cfg.compare`, scenario by scenario, seed by seed: centralised first, then the local
    arms, then the strategies."""
    c = cfg.compare
    if cfg.finetune.task != "dr":
        raise ConfigError(f"finetune.task: compare grades DR; set it to dr (got {cfg.finetune.task!r})")
    for key in STEP_KEYS:
        if getattr(cfg.federation, key.split(".")[1]):
            raise ConfigError(f"{key}: compare matches compute itself; leave it out and name the rounds")
        for name, overrides in c.strategies.items():
            if key in overrides:
                raise ConfigError(
                    f"compare.strategies.{name}: {key} is derived from the rounds; name the rounds instead"
                )
    if c.encoder and c.pretrain:
        raise ConfigError("compare.encoder: a given encoder replaces pretraining; set compare.pretrain=false")
    arms = []
    for key, names in c.scenarios.items():
        scenario = load_scenario(key)
        for seed in c.seeds:
            base = _phases(cfg.model_copy(update={"seed": seed}))
            arms.append(_arm(CENTRALISED, CENTRALISED, key, scenario, base))
            if c.local:
                labelled_parts = _labelled_parts(scenario, seed, cfg.finetune.task)
                arms += [
                    _arm(LOCAL, f"local:{name}", key, scenario, base, part) for part, name in labelled_parts
                ]
            for name in names or tuple(c.strategies):
                fed = _equal_compute(base, c.strategies[name], scenario, f"compare.strategies.{name}")
                arms.append(_arm(FEDERATED, name, key, scenario, fed))
    return arms


def run_compare_arm(arm: CompareArm) -> dict:
    """The arm's record (arm.json), training it unless a finished one exists. A reused record speaks for
    this comparison: its label and scenario are this comparison's names for the arm, whatever names the
    comparison that trained it used."""
    done = arm.folder / ARM_JSON
    if done.exists():
        log.info("%s / seed %d / %s: reusing %s", arm.scenario, arm.seed, arm.label, arm.folder)
        return json.loads(done.read_text()) | _names(arm)
    arm.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(arm.folder / "settings.yaml", dump_config(arm.cfg))
    started = time.monotonic()
    sites = scenario_sites(load_scenario(arm.scenario), arm.seed)
    mine = [sites[arm.part]] if arm.kind == LOCAL else sites
    counts = _train_images(arm.cfg, sites)
    own_bn: dict[str, dict[str, torch.Tensor]] = {}
    if arm.kind == FEDERATED:
        model, record = _federated(arm, len(sites))
        if strategy_of(arm.cfg.federation.strategy).local_batchnorm:
            own_bn = _own_batchnorm(arm, sites, counts)
    else:
        share = sum(counts.get(s.name, 0) for s in mine) / sum(counts.values())  # of a pooled pass
        model, record = _centralised(arm, mine, share)
    record |= _names(arm) | {
        "wall_s": time.monotonic() - started,
        "train_images": {s.name: counts[s.name] for s in mine if s.name in counts},
    }
    held_out = [load_site(p) for p in arm.cfg.compare.test_sites]
    save_arrays(arm.folder / TEST_NPZ, **_predict(arm.cfg, [*sites, *held_out], model, own_bn))
    atomic_write_text(done, json.dumps(record, indent=2))
    return record


def _names(arm: CompareArm) -> dict:
    return {"kind": arm.kind, "label": arm.label, "scenario": arm.scenario, "seed": arm.seed}


def load_predictions(arm: CompareArm) -> dict[str, np.ndarray]:
    """The arm's test.npz: image_id, site, y, probs and logits, in image-id order (the same for every arm
    of a scenario, so arms pair image by image)."""
    with np.load(arm.folder / TEST_NPZ, allow_pickle=False) as saved:
        return {k: saved[k] for k in saved.files}


# ------------------------------------------------------------------------------------------ settings
def _phases(cfg: ExperimentConfig) -> ExperimentConfig:
    """The settings every arm of a seed shares: phases sized by the federation's rounds, and the start."""
    c, f = cfg.compare, cfg.federation
    pretrain_rounds = f.rounds_pretrain if c.pretrain else 0
    return cfg.model_copy(
        update={
            "pretrain": cfg.pretrain.model_copy(update={"epochs": max(1, pretrain_rounds * f.local_epochs)}),
            "finetune": cfg.finetune.model_copy(
                update={
                    "protocol": "holdout",
                    "label_fractions": (1.0,),
                    "epochs": f.rounds_finetune * f.local_epochs,
                    "steps": 0,
                }
            ),
            "federation": f.model_copy(
                update={
                    "rounds_pretrain": pretrain_rounds,
                    "start_encoder": c.encoder,
                    "tasks": (cfg.finetune.task,),  # one head, the one every arm is scored on
                }
            ),
        }
    )


def _equal_compute(
    base: ExperimentConfig, overrides: dict, scenario: Scenario, source: str
) -> ExperimentConfig:
    """A strategy's settings at the centralised arm's sample-gradients: a phase whose rounds (x local
    epochs) the strategy changes takes epochs x pooled images / (rounds x sites x batch) local steps a
    round, the rule the pretraining study's federated arms follow. Local steps named outright are refused:
    they would leave the compute to chance (`plan_arms` refuses them)."""
    fed = override(base, overrides, source)
    f, b = fed.federation, base.federation
    if f.rounds_pretrain and not b.rounds_pretrain:
        raise ConfigError(f"{source}: federation.rounds_pretrain: compare.pretrain is off; set it to true")
    pretrain = f.rounds_pretrain and f.rounds_pretrain * f.local_epochs != b.rounds_pretrain * b.local_epochs
    finetune = f.rounds_finetune and f.rounds_finetune * f.local_epochs != b.rounds_finetune * b.local_epochs
    if not (pretrain or finetune):
        return fed
    sites = scenario_sites(scenario, base.seed)
    update: dict[str, int] = {}
    if pretrain:
        images = [len(s.rows) for s in sites]
        steps = Span.equal_compute_steps(
            base.pretrain.epochs, images, f.rounds_pretrain, fed.pretrain.batch_size
        )
        update["local_steps"] = steps
    if finetune:
        images = [n for n in _train_images(fed, sites).values() if n]
        steps = Span.equal_compute_steps(
            base.finetune.epochs, images, f.rounds_finetune, fed.finetune.batch_size
        )
        update["local_steps_finetune"] = steps
    if "local_steps" in update and "local_steps_finetune" not in update:
        update["local_steps_finetune"] = 0  # fine-tuning keeps its epoch-long rounds
    return fed.model_copy(update={"federation": f.model_copy(update=update)})


def _arm(
    kind: str, label: str, key: str, scenario: Scenario, cfg: ExperimentConfig, part: int = -1
) -> CompareArm:
    settings = cfg.model_dump(mode="json", exclude={"name", "runs_dir", "compare", "study"})
    identity = {
        "kind": kind,
        "part": part,
        "settings": settings,
        "scenario": _absolute(scenario).model_dump(mode="json", exclude={"name", "description"}),
        "site_yamls": [_site_yaml(p) for p in (*scenario.sites, *_sources(scenario))],
    }
    if cfg.compare.test_sites:  # only then: the arms of comparisons without them keep their identity
        identity["test_sites"] = [_site_yaml(p) for p in cfg.compare.test_sites]
    digest = hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=6).hexdigest()
    resolved = cfg.model_copy(
        update={"name": f"{kind}-{digest}", "runs_dir": str((Path(cfg.runs_dir) / "arms").resolve())}
    )
    return CompareArm(kind, label, key, cfg.seed, resolved, part)


def _site_yaml(path: str) -> str:
    if not Path(path).is_file():
        hint = (
            " (render the synthetic sites first: `fedretina synth --profile cpu`)"
            if "generated" in path
            else ""
        )
        raise ConfigError(f"site YAML {path} not found{hint}")
    return Path(path).read_text()


def _absolute(scenario: Scenario) -> Scenario:
    """The scenario with absolute site paths: the same data named from another folder is the same arm."""
    sites = tuple(str(Path(p).resolve()) for p in scenario.sites)
    split = scenario.split and scenario.split.model_copy(
        update={"source": str(Path(scenario.split.source).resolve())}
    )
    return scenario.model_copy(update={"sites": sites, "split": split})


def _sources(scenario: Scenario) -> list[str]:
    return [scenario.split.source] if scenario.split else []


def _labelled_parts(scenario: Scenario, seed: int, task: str) -> list[tuple[int, str]]:
    """(part, site name) of the scenario's sites that hold the task's labels."""
    sites = scenario_sites(scenario, seed)
    column = label_column(task)
    return [(i, s.name) for i, s in enumerate(sites) if column in s.rows and len(labelled(s.rows, task))]


def _train_images(cfg: ExperimentConfig, sites: list[Site]) -> dict[str, int]:
    """Each site's labelled training images (its development split less its validation split)."""
    task = cfg.finetune.task
    return {s.name: len(finetune_split(s.rows, task, cfg)[0]) for s in sites if label_column(task) in s.rows}


# ------------------------------------------------------------------------------------------ training
def _centralised(arm: CompareArm, sites: list[Site], share: float) -> tuple[dict[str, torch.Tensor], dict]:
    """Pretraining (when compared) and fine-tuning on the pooled `sites`, through `fedretina pretrain` and
    `fedretina finetune`'s own functions (resumed where an interrupted arm left them). An epoch over these
    sites is `share` of a pass over the scenario's pooled training images."""
    cfg = arm.cfg
    finetune = cfg.finetune.model_copy(update={"inits": {START: _start(cfg, sites)}})
    out = run_finetuning(cfg.model_copy(update={"finetune": finetune}), resume=True, sites=sites).directory
    history = pd.read_csv(out / "history" / f"{START}_100pct_fold0.csv")
    model, _ = load_weights(out / "checkpoints" / f"{START}_100pct_fold0.safetensors")
    curve = [
        {"epochs": (i + 1) * share, **{k: _num(row.get(k)) for k in CURVE_KEYS}}
        for i, row in enumerate(history.to_dict("records"))
    ]
    folds = pd.read_csv(out / "folds.csv")
    spent = folds["epsilon"].max() if "epsilon" in folds else None
    epsilon = {"+".join(s.name for s in sites): float(spent)} if spent is not None else {}
    return model, {"curve": curve, "bytes_per_round": [], "epsilon": epsilon}


def _start(cfg: ExperimentConfig, sites: list[Site]) -> InitConfig:
    """Fine-tuning's encoder: SparK pretrained on `sites` (when compared), the given encoder, or random."""
    if cfg.federation.rounds_pretrain:
        weights = str(run_pretraining(cfg, resume=True, sites=sites).encoder)
    elif cfg.federation.start_encoder:
        weights = cfg.federation.start_encoder
    else:
        return InitConfig()
    _, kind = read_encoder_export(Path(weights), cfg.model)
    return InitConfig(kind=kind, weights=weights)


def _federated(arm: CompareArm, nodes: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The scenario simulated with real `flwr run .` under the arm's settings."""
    label = f"{arm.scenario} seed {arm.seed} {arm.label}"
    federation = simulate(arm.cfg, scenario_path(arm.scenario), nodes, label)
    model, _ = load_weights(federation / "model.safetensors")
    passes = arm.cfg.finetune.epochs / max(1, arm.cfg.federation.rounds_finetune)  # equal compute, per round
    return model, _store_record(federation / "store.sqlite", passes)


def _own_batchnorm(
    arm: CompareArm, sites: list[Site], train_images: dict[str, int]
) -> dict[str, dict[str, torch.Tensor]]:
    """FedBN: each site's own BatchNorm after its last fine-tuning round, read from the site's state folder
    (what that site predicts with; the exported model carries the server's average instead). A site that
    trained (`train_images`) but kept none is scored with the average, and said so."""
    run = StoreReader(arm.folder / "federation" / "store.sqlite").run()
    uid = str(run["run_uid"]) if run else ""
    own = {}
    for site in sites:
        found = own_batchnorm(state_dir(site, uid), FINETUNE, arm.cfg.federation.rounds_finetune, uid)
        if found is not None:
            own[site.name] = found[1]
        elif train_images.get(site.name):
            log.warning(
                "%s: site %s kept no BatchNorm of its own; scoring it with the server's", arm.label, site.name
            )
    return own


def _store_record(store: Path, passes: float) -> dict:
    """The curve (validation metrics after every fine-tuning round, image-weighted over the sites, at the
    `passes` over the pooled training images each round pays for), upload bytes per round and each site's
    epsilon, from the run store."""
    reader = StoreReader(store)
    keys = {f"dr-{k}": k for k in CURVE_KEYS}
    curve: dict[int, dict] = {}
    for row in reader.metrics(FINETUNE, "federated-eval"):
        if row["key"] in keys:
            rnd = int(row["round"])
            curve.setdefault(rnd, {"epochs": rnd * passes})[keys[row["key"]]] = _num(row["value"])
    uploads: dict[tuple[str, int], int] = {}
    epsilon: dict[str, float] = {}
    for row in reader.replies(kind="train"):
        key = (row["phase"], int(row["round"]))
        uploads[key] = uploads.get(key, 0) + int(row["bytes"] or 0)
        value = row["metrics"].get(EPSILON)
        if value is not None:
            epsilon[row["site"]] = max(epsilon.get(row["site"], 0.0), float(value))
    per_round = [{"phase": p, "round": r, "bytes": b} for (p, r), b in uploads.items()]
    return {"curve": [curve[r] for r in sorted(curve)], "bytes_per_round": per_round, "epsilon": epsilon}


def _num(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if np.isnan(number) else number


# ------------------------------------------------------------------------------------------ scoring
def _predict(
    cfg: ExperimentConfig,
    sites: list[Site],
    state: dict[str, torch.Tensor],
    own_bn: dict[str, dict[str, torch.Tensor]],
) -> dict[str, np.ndarray]:
    """The model's predictions on the test images of every site (the scenario's, then `compare.test_sites`),
    in image-id order; a site in `own_bn` (FedBN) predicts with its own BatchNorm, the others with the
    model's."""
    task = cfg.finetune.task
    classes = task_classes(pd.concat([labelled(s.rows, task) for s in sites]))[task]
    model = build_task_model(cfg, {task: classes})
    parts = []
    for site in sites:
        rows = site_test_rows(site, task)
        if len(rows):
            model.load_state_dict({**state, **own_bn.get(site.name, {})})
            data = site_images(site, cfg, cfg.finetune_image_size, "none", rows=rows, task=task)
            y, logits = predict_logits(model, data, task, torch.device("cpu"))
            ids = rows["image_id"].to_numpy(dtype=str)
            parts.append({"image_id": ids, "site": np.full(len(ids), site.name), "y": y, "logits": logits})
    if not parts:
        raise ConfigError(f"the scenario's sites hold no {task} test images to score the arms on")
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(joined["image_id"], kind="stable")
    out = {k: v[order] for k, v in joined.items()}
    return out | {"y": out["y"].astype(np.int64), "probs": softmax(out["logits"])}
