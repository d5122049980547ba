"""`fedretina finetune`: the seeds' evaluation protocol on pooled site data.

For each configured initialisation x label fraction x fold: patient-grouped stratified k-fold CV on the
development images (each fold's model is selected on an inner, patient-disjoint validation split, never on
test data), the held-out fold reports the CV metrics, and a site's own test split (EyePACS Private, IDRiD
test) is evaluated by every fold's selected model, with bootstrap 95% intervals. Label fractions are nested
subsets of each fold's training patients. Results: folds.csv, summary.json, table.md, ROC / confusion /
AUC-vs-fraction PNGs, each fold's best model as safetensors and its CV predictions (predictions/*.npz, so
the plots after a --resume still cover every fold). Finished folds are skipped on --resume.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from shared.config import ExperimentConfig, InitConfig
from shared.data.labels import label_column
from shared.data.manifest import labelled, task_classes
from shared.data.site import Site
from shared.data.splits import assign_folds, inner_split, label_subset
from shared.data.transforms import Recipe
from shared.device import configure_torch
from shared.errors import CheckpointError, ConfigError
from shared.metrics import bootstrap_ci, evaluate_predictions, mean_std, metric_keys
from shared.plots import auc_vs_fraction, confusion_plot, roc_plot
from shared.rundir import atomic_write_bytes, atomic_write_text, run_dir, start_run_dir
from shared.seeding import derive_seed, seed_everything
from shared.training.data import load_sites, pooled, site_images
from shared.training.finetune import (
    build_task_model,
    class_weights,
    finetune_epoch,
    finetune_optimizer,
    finetune_schedule,
    predict,
)
from shared.training.init import check_init, initialise
from shared.training.pretrain import steps_per_epoch
from shared.weights import model_meta, save_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cohort:
    """The labelled images of every site holding the task, pooled, with patient ids made site-unique."""

    sites: dict[str, Site]
    dev: pd.DataFrame  # cross-validated
    test: pd.DataFrame  # the datasets' own held-out test splits
    column: str
    num_classes: int


@dataclass(frozen=True)
class FinetuneOutputs:
    directory: Path
    table: str
    summary: dict


def run_finetuning(cfg: ExperimentConfig, *, resume: bool = False) -> FinetuneOutputs:
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
    out = start_run_dir(cfg, "finetune")
    cohort = _cohort(cfg)
    device = configure_torch(cfg)
    folds = assign_folds(cohort.dev, cohort.column, f.folds, cfg.seed)
    done = pd.read_csv(out / "folds.csv") if resume and (out / "folds.csv").exists() else pd.DataFrame()
    rows = done.to_dict("records")
    for init_name, init in f.inits.items():
        for fraction in f.label_fractions:
            for fold in range(f.run_folds or f.folds):
                if _finished(done, init_name, fraction, fold):
                    log.info(
                        "skipping finished %s / %.0f%% labels / fold %d", init_name, 100 * fraction, fold
                    )
                    continue
                rows += _run_fold(cfg, cohort, folds, init_name, init, fraction, fold, device, out)
                atomic_write_text(out / "folds.csv", pd.DataFrame(rows).to_csv(index=False))
    summary = _summarise(cfg, pd.DataFrame(rows))
    table = _table(summary, metric_keys(f.task))
    atomic_write_text(out / "summary.json", json.dumps(_no_nan(summary), indent=2))
    atomic_write_text(out / "table.md", table)
    _plots(out, summary, f.task)
    return FinetuneOutputs(out, table, summary)


def _cohort(cfg: ExperimentConfig) -> Cohort:
    task = cfg.finetune.task
    column = label_column(task)
    sites = {s.name: s for s in load_sites(cfg.sites) if column in s.rows}
    if not sites:
        raise ConfigError(
            f"finetune.task: no configured site holds labels for task {task!r} (column {column})"
        )
    frames = []
    for name, site in sites.items():
        rows = labelled(site.rows, task).copy()
        rows["patient_id"] = name + "/" + rows["patient_id"]
        frames.append(rows)
    data = pd.concat(frames, ignore_index=True)
    num_classes = task_classes(data)[task]
    dev, test = data[data["split"] != "test"], data[data["split"] == "test"]
    log.info(
        "task %s: %d development images (%d patients), %d test images, sites %s",
        task,
        len(dev),
        dev["patient_id"].nunique(),
        len(test),
        ", ".join(sites),
    )
    return Cohort(sites, dev.reset_index(drop=True), test.reset_index(drop=True), column, num_classes)


def images(cohort: Cohort, cfg: ExperimentConfig, rows: pd.DataFrame, recipe: Recipe) -> Dataset:
    """Rows from several sites as one dataset (each site's rows read through that site's cache)."""
    parts = [
        site_images(
            cohort.sites[name], cfg, cfg.finetune_image_size, recipe, rows=group, task=cfg.finetune.task
        )
        for name, group in rows.groupby("site", sort=True)
    ]
    return pooled(parts)


def _run_fold(
    cfg,
    cohort,
    folds,
    init_name: str,
    init: InitConfig,
    fraction: float,
    fold: int,
    device: torch.device,
    out: Path,
) -> list[dict]:
    """Train, select and score one fold; returns its folds.csv rows (CV, and the sites' test split)."""
    f, task = cfg.finetune, cfg.finetune.task
    outer_train, outer_test = cohort.dev[folds != fold], cohort.dev[folds == fold]
    subset = label_subset(outer_train, cohort.column, fraction, derive_seed(cfg.seed, "fraction", fold))
    train, val = inner_split(subset, cohort.column, f.val_fraction, derive_seed(cfg.seed, "val", fold))
    # Training rows in a stable order so the epoch permutation depends on the seed alone.
    train = train.sort_values(["site", "image_id"]).reset_index(drop=True)
    seed_everything(derive_seed(cfg.seed, "init", init_name, fold))
    model = build_task_model(cfg, {task: cohort.num_classes})
    origin = initialise(model.encoder, init.kind, init.weights, cfg.model)
    model.to(device)
    train_ds = images(cohort, cfg, train, f.augment)
    val_ds = images(cohort, cfg, val, "none")
    optimizer = finetune_optimizer(model, cfg)
    per_epoch = steps_per_epoch(len(train_ds), f.batch_size)
    schedule = finetune_schedule(cfg, per_epoch, per_epoch * f.epochs)
    weights = (
        class_weights(train[cohort.column].to_numpy(int), cohort.num_classes) if f.class_weighting else None
    )
    log.info(
        "%s (%s), %.0f%% labels, fold %d: %d train / %d val images",
        init_name,
        origin,
        100 * fraction,
        fold,
        len(train),
        len(val),
    )
    best_score, best_state, best_epoch, step, stale = -math.inf, None, 0, 0, 0
    key = f"{init_name}/{fraction}/{fold}"
    for epoch in range(f.epochs):
        result = finetune_epoch(
            model,
            optimizer,
            schedule,
            train_ds,
            cfg,
            task=task,
            epoch=epoch,
            key=key,
            step=step,
            device=device,
            weights=weights,
            desc=f"{init_name} fold {fold}",
        )
        step += result.steps
        val_metrics = evaluate_predictions(
            *predict(model, val_ds, task, device, f.batch_size),
            task,
            referable_threshold=f.referable_threshold,
        )
        score = -val_metrics["loss"] if f.select_metric == "loss" else val_metrics[f.select_metric]
        score = -math.inf if math.isnan(score) else score
        log.info(
            "  epoch %d: train loss %.4f, val %s %.4f",
            epoch + 1,
            result.loss,
            f.select_metric,
            val_metrics[f.select_metric],
        )
        if score > best_score or best_state is None:
            best_score, best_state, best_epoch, stale = score, copy.deepcopy(model.state_dict()), epoch + 1, 0
        else:
            stale += 1
            if f.early_stopping and stale >= f.early_stopping:
                break
    model.load_state_dict(best_state)
    name = f"{_tag(init_name, fraction)}_fold{fold}"
    save_weights(
        out / "checkpoints" / f"{name}.safetensors",
        model.state_dict(),
        {
            **model_meta(cfg.model),
            "kind": "task-model",
            "task": task,
            "classes": cohort.num_classes,
            "init": init_name,
            "fraction": fraction,
            "fold": fold,
            "best_epoch": best_epoch,
        },
    )
    base = {
        "init": init_name,
        "fraction": fraction,
        "fold": fold,
        "best_epoch": best_epoch,
        "train_images": len(train),
        "val_images": len(val),
    }
    cv_true, cv_probs = predict(model, images(cohort, cfg, outer_test, "none"), task, device, f.batch_size)
    _save_predictions(out / "predictions" / f"{name}.npz", cv_true, cv_probs)
    rows = [
        {
            **base,
            "split": "cv",
            "images": len(outer_test),
            **evaluate_predictions(cv_true, cv_probs, task, referable_threshold=f.referable_threshold),
        }
    ]
    if len(cohort.test):
        y, p = predict(model, images(cohort, cfg, cohort.test, "none"), task, device, f.batch_size)
        test = evaluate_predictions(y, p, task, referable_threshold=f.referable_threshold)

        def auc(a: np.ndarray, b: np.ndarray) -> float:
            return evaluate_predictions(a, b, task)["auc"]

        low, high = bootstrap_ci(y, p, auc, rounds=f.bootstrap, seed=derive_seed(cfg.seed, "bootstrap", fold))
        rows.append(
            {**base, "split": "test", "images": len(y), **test, "auc_ci_low": low, "auc_ci_high": high}
        )
    return rows


def _tag(init: str, fraction: float) -> str:
    return f"{init}_{round(100 * fraction)}pct"


def _finished(done: pd.DataFrame, init: str, fraction: float, fold: int) -> bool:
    if done.empty:
        return False
    match = (done["init"] == init) & np.isclose(done["fraction"], fraction) & (done["fold"] == fold)
    return bool(match.any())


def _summarise(cfg: ExperimentConfig, df: pd.DataFrame) -> dict:
    keys = metric_keys(cfg.finetune.task)
    out: dict = {"task": cfg.finetune.task, "folds": cfg.finetune.folds, "results": []}
    for (init, fraction, split), group in df.groupby(["init", "fraction", "split"], sort=False):
        stats = mean_std(group[list(keys)].to_dict("records"))
        entry = {
            "init": init,
            "fraction": fraction,
            "split": split,
            "n_folds": len(group),
            "metrics": {k: {"mean": m, "std": s} for k, (m, s) in stats.items()},
        }
        out["results"].append(entry)
    return out


def _table(summary: dict, keys: tuple[str, ...]) -> str:
    shown = [k for k in ("accuracy", "auc", "kappa", "f1_weighted", "referable_auc") if k in keys]
    lines = [
        "| init | labels | split | folds | " + " | ".join(shown) + " |",
        "|---|---|---|---|" + "---|" * len(shown),
    ]
    for r in summary["results"]:
        cells = [_pm(r["metrics"][k]["mean"], r["metrics"][k]["std"]) for k in shown]
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


def _save_predictions(path: Path, y_true: np.ndarray, probs: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, y_true=y_true, probs=probs)
    atomic_write_bytes(path, buffer.getvalue())


def _plots(out: Path, summary: dict, task: str) -> None:
    """ROC and confusion per (init, fraction) over every finished fold's CV predictions, AUC vs fraction."""
    for r in summary["results"]:
        if r["split"] != "cv":
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
        roc_plot(out / f"roc_{tag}.png", y, p, title=f"{task} ROC, {about} (CV folds)")
        confusion_plot(out / f"confusion_{tag}.png", y, p, title=f"{task}, {about}")
    cv = [r for r in summary["results"] if r["split"] == "cv"]
    auc_vs_fraction(out / "auc_vs_fraction.png", cv, title=f"{task}: AUC vs label fraction (CV)")


def _no_nan(value: object) -> object:
    """NaN (an undefined metric) as JSON null."""
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value
