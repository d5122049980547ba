"""`fedretina finetune`: the seeds' evaluation protocol (or the federation's) on pooled site data.

Every arm (initialisation x label fraction x fold) is a short composition of named steps: split, build,
train with early stopping (`run_phase`, the function a federated round runs), select, predict, bootstrap.

- `protocol: cv` (the seeds'): patient-grouped stratified k-fold CV on the development images; each fold's
  model is selected on an inner, patient-disjoint validation split, never on test data; the held-out fold
  reports the CV metrics. Label fractions are nested subsets of each fold's training patients.
- `protocol: holdout` (the federation's, centralised): each site's development images split by patient as a
  federated site splits them, `epochs` epochs from the heads federated phase 2 starts with, the last epoch's
  model; the validation split is reported. One site holding the data gives bitwise what a single-task
  federation does.

Either way, a site's own test split (EyePACS Private, IDRiD test) is scored by every arm's model, with
bootstrap 95% intervals. Results: folds.csv, summary.json, table.md, ROC / confusion / AUC-vs-fraction PNGs,
each arm's model as safetensors, its per-epoch history (history/*.csv: train loss, validation metrics,
seconds) and its predictions (predictions/*.npz, so the plots after a --resume still cover every fold;
predictions/test/*.npz on the test split, for paired comparisons).
Finished arms are skipped on --resume; settings that shape them may not change.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from shared.config import ExperimentConfig, InitConfig
from shared.data.labels import label_column
from shared.data.manifest import labelled, task_classes
from shared.data.site import Site
from shared.data.splits import assign_folds, inner_split, label_count_subset, label_subset
from shared.data.transforms import Recipe
from shared.device import configure_torch
from shared.errors import CheckpointError, ConfigError
from shared.metrics import bootstrap_ci, evaluate_predictions, mean_std, metric_keys
from shared.models import TaskModel
from shared.plots import auc_vs_fraction, confusion_plot, roc_plot
from shared.privacy.central import LEDGER, private_sgd, release
from shared.privacy.ledger import Ledger
from shared.rundir import Report, atomic_write_text, run_dir, save_arrays, start_run_dir
from shared.seeding import derive_seed
from shared.training.data import data_key, load_sites, pooled, site_images
from shared.training.finetune import (
    BN_SETTLED,
    classifier_method,
    finetune_split,
    predict,
    predict_logits,
    reestimate_batchnorm,
    site_test_rows,
    softmax,
    task_weights,
)
from shared.training.initialisation import FINETUNE_SEED, check_init, finetuning_start, initialise
from shared.training.phase import EpochEnd, Span, run_phase
from shared.weights import check_settings, load_weights, save_weights, weights_meta

log = logging.getLogger(__name__)
ARM_CHOICE = ("finetune.inits", "finetune.label_fractions", "finetune.run_folds")  # may change on --resume


@dataclass(frozen=True)
class Cohort:
    """The labelled images of every site holding the task, pooled, with patient ids made site-unique."""

    sites: dict[str, Site]
    dev: pd.DataFrame  # cross-validated, or split by site as the federation does
    test: pd.DataFrame  # the datasets' own held-out test splits
    column: str
    num_classes: int
    external: pd.DataFrame  # every labelled image of the external sites (never trained on); may be empty


@dataclass(frozen=True)
class Arm:
    """One model of the study: an initialisation, a label fraction (or, `count` > 0, about that many
    labelled images), a fold (always 0 under hold-out)."""

    init_name: str
    init: InitConfig
    fraction: float
    fold: int
    count: int = 0

    @property
    def name(self) -> str:
        amount = f"{self.init_name}_{self.count}img" if self.count else _tag(self.init_name, self.fraction)
        return f"{amount}_fold{self.fold}"

    @property
    def labels(self) -> str:
        """The label amount, as a seed key shared by every init (paired subsets and batch order)."""
        return f"{self.count}img" if self.count else str(self.fraction)


@dataclass(frozen=True)
class Split:
    train: pd.DataFrame
    val: pd.DataFrame  # selects the epoch (cv) or is reported each epoch (holdout)
    scored: dict[str, pd.DataFrame]  # split name -> rows the arm's model is scored on


@dataclass(frozen=True)
class Study:
    cfg: ExperimentConfig
    cohort: Cohort
    folds: np.ndarray | None  # cv: each development row's fold
    device: torch.device
    out: Path

    @property
    def task(self) -> str:
        return self.cfg.finetune.task

    @property
    def reported(self) -> str:
        """The development split each arm reports: the held-out fold (cv) or the validation split."""
        return "cv" if self.cfg.finetune.protocol == "cv" else "val"


@dataclass(frozen=True)
class FinetuneOutputs(Report):
    summary: dict


def run_finetuning(
    cfg: ExperimentConfig, *, resume: bool = False, sites: list[Site] | None = None
) -> FinetuneOutputs:
    """Every arm of `cfg.finetune` on `cfg.sites` (or the given `sites`: a scenario's parts)."""
    f = cfg.finetune
    if f.select_metric not in metric_keys(f.task):
        raise ConfigError(
            f"finetune.select_metric: {f.select_metric!r} is not one of {list(metric_keys(f.task))}"
        )
    for init in f.inits.values():
        check_init(init.kind, init.weights, cfg.model)
    folds_csv = run_dir(cfg, "finetune") / "folds.csv"
    if folds_csv.exists() and not resume:
        raise CheckpointError(f"{folds_csv} exists: pass --resume to finish that run, or pick another --name")
    if resume:
        _check_resumable(run_dir(cfg, "finetune"), cfg)
    out = start_run_dir(cfg, "finetune")
    cohort = cohort_of(cfg, sites=sites)
    folds = assign_folds(cohort.dev, cohort.column, f.folds, cfg.seed) if f.protocol == "cv" else None
    study = Study(cfg, cohort, folds, configure_torch(cfg), out)
    done = pd.read_csv(folds_csv) if resume and folds_csv.exists() else pd.DataFrame()
    rows = done.to_dict("records")
    for arm in _arms(cfg):
        if _finished(done, arm):
            log.info(
                "skipping finished %s / %.0f%% labels / fold %d", arm.init_name, 100 * arm.fraction, arm.fold
            )
            continue
        rows += run_arm(study, arm)
        atomic_write_text(folds_csv, pd.DataFrame(rows).to_csv(index=False))
    summary = _summarise(cfg, pd.DataFrame(rows))
    table = _table(summary, metric_keys(f.task))
    atomic_write_text(out / "summary.json", json.dumps(no_nan(summary), indent=2))
    atomic_write_text(out / "table.md", table)
    _plots(out, summary, f.task, study.reported)
    return FinetuneOutputs(out, table, summary)


def run_arm(study: Study, arm: Arm) -> list[dict]:
    """Split, build, train with early stopping and selection, then score: one arm's folds.csv rows."""
    split = _split(study, arm)
    model, origin = _build(study, arm)
    log.info(
        "%s (%s), labels %s, fold %d: %d train / %d val images",
        arm.init_name,
        origin,
        f"{arm.count} images" if arm.count else f"{arm.fraction:.0%}",
        arm.fold,
        len(split.train),
        len(split.val),
    )
    best_epoch, spent = _train(study, arm, model, split)
    meta = weights_meta(
        study.cfg,
        "task-model",
        tasks={study.task: study.cohort.num_classes},
        init=arm.init_name,
        fraction=arm.fraction,
        fold=arm.fold,
        best_epoch=best_epoch,
    )
    save_weights(study.out / "checkpoints" / f"{arm.name}.safetensors", model.state_dict(), meta)
    base = {
        "init": arm.init_name,
        "fraction": arm.fraction,
        "count": arm.count,
        "fold": arm.fold,
        "best_epoch": best_epoch,
        "train_images": len(split.train),
        "val_images": len(split.val),
    } | ({"epsilon": spent} if spent is not None else {})
    return [_score(study, arm, model, name, rows) | base for name, rows in split.scored.items() if len(rows)]


def cohort_of(
    cfg: ExperimentConfig,
    external: tuple[str, ...] = (),
    sites: list[Site] | None = None,
    held_out: tuple[str, ...] = (),
) -> Cohort:
    """The labelled images of the configured sites (or of `sites`), of the `external` site YAMLs (scored
    only), and the test splits of the `held_out` site YAMLs (more patients of the same population, joined
    to the test split so its intervals narrow; never trained on)."""
    task = cfg.finetune.task
    column = label_column(task)
    sites = {s.name: s for s in (sites or load_sites(cfg.sites)) if column in s.rows}
    if not sites:
        raise ConfigError(
            f"finetune.task: no configured site holds labels for task {task!r} (column {column})"
        )
    outside = {s.name: s for s in load_sites(external)} if external else {}
    kept = {s.name: s for s in load_sites(held_out)} if held_out else {}
    for key, extra_sites in (("external_sites", outside), ("test_sites", kept)):
        if shared := sorted(set(extra_sites) & set(sites)):
            raise ConfigError(f"study.{key}: {shared} also trains; a site scored only must be new")
        for name, site in extra_sites.items():
            if column not in site.rows or not len(labelled(site.rows, task)):
                raise ConfigError(f"study.{key}: site {name} holds no {task!r} labels to score")
    data = pd.concat([_site_unique(labelled(s.rows, task), n) for n, s in sites.items()], ignore_index=True)
    dev, test = data[data["split"] != "test"], data[data["split"] == "test"]
    if kept:
        more = [_site_unique(site_test_rows(s, task), n) for n, s in kept.items()]
        test = pd.concat([test, *more], ignore_index=True)
    scored = [_site_unique(labelled(s.rows, task), n) for n, s in outside.items()]
    extra = pd.concat(scored, ignore_index=True) if scored else data.iloc[0:0]
    log.info(
        "task %s: %d development images (%d patients), %d test images, sites %s",
        task,
        len(dev),
        dev["patient_id"].nunique(),
        len(test),
        ", ".join(sites),
    )
    return Cohort(
        sites | outside | kept,
        dev.reset_index(drop=True),
        test.reset_index(drop=True),
        column,
        task_classes(data)[task],
        extra.reset_index(drop=True),
    )


def _arms(cfg: ExperimentConfig) -> list[Arm]:
    f = cfg.finetune
    folds = range(f.run_folds or f.folds) if f.protocol == "cv" else range(1)
    return [
        Arm(n, init, fraction, k)
        for n, init in f.inits.items()
        for fraction in f.label_fractions
        for k in folds
    ]


def _split(study: Study, arm: Arm) -> Split:
    """Train / validation / scored rows: a CV fold, or every site split as its federated self would."""
    cfg, cohort = study.cfg, study.cohort
    if cfg.finetune.protocol == "holdout":
        parts = {n: finetune_split(s.rows, study.task, cfg) for n, s in cohort.sites.items()}
        train = pd.concat([_site_unique(tr, n) for n, (tr, _) in parts.items()], ignore_index=True)
        val = pd.concat([_site_unique(va, n) for n, (_, va) in parts.items()], ignore_index=True)
        train = label_subset(train, cohort.column, arm.fraction, derive_seed(cfg.seed, "fraction", arm.fold))
        scored = {"val": val}
    else:
        assert study.folds is not None
        outer = cohort.dev[study.folds != arm.fold]
        seed = derive_seed(cfg.seed, "fraction", arm.fold)
        if arm.count:
            subset = label_count_subset(outer, cohort.column, arm.count, seed)
        else:
            subset = label_subset(outer, cohort.column, arm.fraction, seed)
        train, val = inner_split(
            subset, cohort.column, cfg.finetune.val_fraction, derive_seed(cfg.seed, "val", arm.fold)
        )
        scored = {"cv": cohort.dev[study.folds == arm.fold]}
    # Training rows in a stable order, so an epoch's permutation depends on its seed alone.
    train = train.sort_values(["site", "image_id"]).reset_index(drop=True)
    scored |= {"test": cohort.test, "external": cohort.external}
    return Split(train, val.reset_index(drop=True), scored)


def _build(study: Study, arm: Arm) -> tuple[nn.Module, str]:
    """The seeded task model with its encoder's start; hold-out heads start as federated phase 2's do, and
    under CV every init of a fold starts from the same heads (paired arms)."""
    cfg, tasks = study.cfg, {study.task: study.cohort.num_classes}
    seed_keys = (FINETUNE_SEED,) if cfg.finetune.protocol == "holdout" else ("init", arm.fold)
    model = finetuning_start(cfg, tasks, *seed_keys)
    origin = initialise(model.encoder, arm.init.kind, arm.init.weights, cfg.model)
    return model.to(study.device), origin


def _train(study: Study, arm: Arm, model: TaskModel, split: Split) -> tuple[int, float | None]:
    """`finetune.epochs` epochs (or `finetune.steps` steps; fewer with early stopping), leaving the selected
    epoch's weights in `model` and each epoch's figures in history/<arm>.csv; returns the selected epoch
    (1-based) and, under DP, the model's epsilon (all the steps it trained). Under CV every init of an arm
    sees the same batches; a validation split under `min_val_images` selects nothing (the last epoch)."""
    cfg, task, cohort, f = study.cfg, study.task, study.cohort, study.cfg.finetune
    holdout = f.protocol == "holdout"
    weights = task_weights({task: split.train}, {task: cohort.num_classes}, cfg)
    val = cohort_images(study, split.val, "none") if len(split.val) else None  # a tiny site may have none
    keep_last = holdout or len(split.val) < f.min_val_images
    selection = Selection(model, lambda: _validate(study, model, val), cfg, keep_last=keep_last)
    per_epoch = max(1, len(split.train) // f.batch_size)
    span = Span.epochs(max(1, round(f.steps / per_epoch)) if f.steps else f.epochs)
    ledger = Ledger(study.out / LEDGER)
    sgd = private_sgd(
        cfg, ledger, arm.name, span.private_plan({task: len(split.train)}, f.batch_size), f.batch_size
    )
    train = cohort_images(study, split.train, f.augment)
    result = run_phase(
        classifier_method(model, cfg, study.device, weights, pretrained=arm.init.kind != "scratch"),
        {task: train},
        span,
        seed=cfg.seed,
        key=data_key(list(cohort.sites.values())) if holdout else f"{arm.labels}/{arm.fold}",
        workers=cfg.data.workers,
        after_epoch=selection,
        desc=f"{arm.init_name} fold {arm.fold}",
        privacy=sgd,
    )
    model.load_state_dict(selection.best_state)
    if not holdout and result.step < BN_SETTLED:  # hold-out stays bitwise the federation's model
        reestimate_batchnorm(model, cohort_images(study, split.train, "none"), study.device, f.batch_size)
    history = pd.DataFrame(selection.history).to_csv(index=False)
    atomic_write_text(study.out / "history" / f"{arm.name}.csv", history)
    spent = release(cfg, ledger, arm.name, sgd.released) if sgd is not None else None
    return selection.best_epoch, spent


class Selection:
    """After every epoch: score the validation split, keep the best epoch's weights (or, `keep_last`, the
    last epoch's, as the federation does), and stop after `finetune.early_stopping` epochs without gain."""

    def __init__(
        self,
        model: nn.Module,
        validate: Callable[[], dict[str, float]],
        cfg: ExperimentConfig,
        *,
        keep_last: bool,
    ) -> None:
        self.model, self.validate, self.keep_last = model, validate, keep_last
        self.metric, self.patience = cfg.finetune.select_metric, cfg.finetune.early_stopping
        self.best_score, self.best_epoch, self.stale = -math.inf, 0, 0
        self.best_state: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, float]] = []  # per epoch: train loss, validation metrics, seconds

    def __call__(self, end: EpochEnd) -> bool:
        metrics = self.validate()
        self.history.append(
            {"epoch": end.epoch + 1, "train_loss": end.loss, "seconds": end.seconds} | metrics
        )
        score = -metrics["loss"] if self.metric == "loss" else metrics[self.metric]
        score = -math.inf if math.isnan(score) else score
        log.info(
            "  epoch %d: train loss %.4f, val %s %.4f",
            end.epoch + 1,
            end.loss,
            self.metric,
            metrics[self.metric],
        )
        if self.keep_last or score > self.best_score or not self.best_state:
            self.best_score, self.best_epoch, self.stale = score, end.epoch + 1, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
            return False
        self.stale += 1
        return bool(self.patience) and self.stale >= self.patience


def _validate(study: Study, model: nn.Module, val: Dataset | None) -> dict[str, float]:
    f = study.cfg.finetune
    if val is None:
        return dict.fromkeys(metric_keys(study.task), math.nan)
    y, p = predict(model, val, study.task, study.device, f.batch_size)
    return evaluate_predictions(y, p, study.task, referable_threshold=f.referable_threshold)


def _score(study: Study, arm: Arm, model: nn.Module, name: str, rows: pd.DataFrame) -> dict:
    """Predict `rows`, the metrics, the AUC's bootstrap interval on a test split, the predictions saved."""
    f, task = study.cfg.finetune, study.task
    y, logits = predict_logits(model, cohort_images(study, rows, "none"), task, study.device, f.batch_size)
    p = softmax(logits)
    row = {
        "split": name,
        "images": len(y),
        **evaluate_predictions(y, p, task, referable_threshold=f.referable_threshold),
    }
    if name == study.reported:
        save_arrays(study.out / "predictions" / f"{arm.name}.npz", y_true=y, probs=p, logits=logits)
    else:  # test and external images, for paired comparisons on the same images (fedretina study)
        save_arrays(study.out / "predictions" / name / f"{arm.name}.npz", y_true=y, probs=p, logits=logits)
    if name == "test":
        low, high = bootstrap_ci(
            y,
            p,
            lambda a, b: evaluate_predictions(a, b, task)["auc"],
            rounds=f.bootstrap,
            seed=derive_seed(study.cfg.seed, "bootstrap", arm.fold),
        )
        row |= {"auc_ci_low": low, "auc_ci_high": high}
    return row


def cohort_images(study: Study, rows: pd.DataFrame, recipe: Recipe) -> Dataset:
    """Rows from several sites as one dataset (each site's rows read through that site's cache)."""
    cfg, sites = study.cfg, study.cohort.sites
    size, task = cfg.finetune_image_size, cfg.finetune.task
    return pooled(
        [
            site_images(sites[n], cfg, size, recipe, rows=g, task=task)
            for n, g in rows.groupby("site", sort=True)
        ]
    )


def _site_unique(rows: pd.DataFrame, site: str) -> pd.DataFrame:
    """`rows` with patient ids prefixed by their site, so pooled sites never share a patient, and the site
    named (a scenario's part, not the dataset it was split from)."""
    rows = rows.copy()
    rows["patient_id"] = site + "/" + rows["patient_id"]
    rows["site"] = site
    return rows


def _check_resumable(out: Path, cfg: ExperimentConfig) -> None:
    """A resumed study may add arms (inits, fractions, folds) but not change how an arm is trained."""
    saved = sorted((out / "checkpoints").glob("*.safetensors"))
    if saved:
        check_settings(saved[0], load_weights(saved[0])[1], cfg, free=ARM_CHOICE)


def _tag(init: str, fraction: float) -> str:
    return f"{init}_{round(100 * fraction)}pct"


def _finished(done: pd.DataFrame, arm: Arm) -> bool:
    if done.empty:
        return False
    match = (
        (done["init"] == arm.init_name)
        & np.isclose(done["fraction"], arm.fraction)
        & (done["fold"] == arm.fold)
    )
    return bool(match.any())


def _summarise(cfg: ExperimentConfig, df: pd.DataFrame) -> dict:
    keys = metric_keys(cfg.finetune.task)
    out: dict = {
        "task": cfg.finetune.task,
        "protocol": cfg.finetune.protocol,
        "folds": cfg.finetune.folds,
        "results": [],
    }
    if cfg.privacy.enabled:
        out |= {"privacy_unit": cfg.privacy.unit, "delta": cfg.privacy.delta}
    for (init, fraction, split), group in df.groupby(["init", "fraction", "split"], sort=False):
        stats = mean_std(group[list(keys)].to_dict("records"))
        entry = {
            "init": init,
            "fraction": fraction,
            "split": split,
            "n_folds": len(group),
            "metrics": {k: {"mean": m, "std": s} for k, (m, s) in stats.items()},
        }
        if "epsilon" in group:  # under DP: the worst fold's, at privacy.delta
            entry["epsilon"] = float(group["epsilon"].max())
        out["results"].append(entry)
    return out


def _table(summary: dict, keys: tuple[str, ...]) -> str:
    shown = [k for k in ("accuracy", "auc", "kappa", "f1_weighted", "referable_auc") if k in keys]
    private = [f"epsilon ({summary['privacy_unit']})"] if "privacy_unit" in summary else []
    lines = [
        "| init | labels | split | folds | " + " | ".join(shown + private) + " |",
        "|---|---|---|---|" + "---|" * len(shown + private),
    ]
    for r in summary["results"]:
        cells = [_pm(r["metrics"][k]["mean"], r["metrics"][k]["std"]) for k in shown]
        cells += [f"{r['epsilon']:.2f}"] if private else []
        lines.append(
            f"| {r['init']} | {r['fraction']:.0%} | {r['split']} | {r['n_folds']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def _plots(out: Path, summary: dict, task: str, reported: str) -> None:
    """ROC and confusion per (init, fraction) over every finished arm's saved predictions, AUC vs fraction."""
    for r in summary["results"]:
        if r["split"] != reported:
            continue
        tag = _tag(r["init"], r["fraction"])
        runs = []
        for path in sorted((out / "predictions").glob(f"{tag}_fold*.npz")):
            with np.load(path, allow_pickle=False) as saved:
                runs.append((saved["y_true"], saved["probs"]))
        if not runs:
            continue
        y, p = np.concatenate([a for a, _ in runs]), np.concatenate([b for _, b in runs])
        about = f"{r['init']}, {r['fraction']:.0%} labels"
        roc_plot(out / f"roc_{tag}.png", y, p, title=f"{task} ROC, {about} ({reported})")
        confusion_plot(out / f"confusion_{tag}.png", y, p, title=f"{task}, {about}")
    shown = [r for r in summary["results"] if r["split"] == reported]
    auc_vs_fraction(out / "auc_vs_fraction.png", shown, title=f"{task}: AUC vs label fraction ({reported})")


def no_nan(value: object) -> object:
    """NaN (an undefined metric) as JSON null."""
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [no_nan(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value
