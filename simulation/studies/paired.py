"""Paired arms and their differences: the machinery both `fedretina study` commands share.

An arm is `fedretina finetune`'s CV arm (fold 0 of each seed's folds) for one initialisation and one label
amount; under one seed every init trains on the same label subset, from the same heads, in the same batch
order, so two inits' arms differ only in where the encoder started (paired). Every arm is scored on the
labelled sites' own test split and on any external site, the same images for all; each arm's predictions
(labels, probabilities, logits) are kept, and a difference init - reference is the mean over seeds with a
paired bootstrap 95% interval over the images (`shared.metrics.paired_difference_ci`).

arms.csv (one row per arm and scored split: init, labels, seed, the metrics, train_images, ...) is rewritten
after every arm, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from shared.config import ExperimentConfig, InitConfig
from shared.data.labels import referable, referable_logit_probability, referable_probability
from shared.data.splits import assign_folds
from shared.device import configure_torch
from shared.metrics import auc_score, paired_difference_ci, quadratic_kappa
from shared.rundir import atomic_write_text
from shared.seeding import derive_seed
from simulation.centralised.finetune import Arm, Cohort, Study, run_arm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Amount:
    """An arm's labels: about `count` labelled images (count > 0), else a `fraction` of the development
    patients (1.0 = all)."""

    count: int = 0
    fraction: float = 1.0

    def arm(self, init: str, spec: InitConfig | None = None) -> Arm:
        """The CV arm (fold 0) of `init` at this amount; `spec` may be left out to name an arm's files."""
        return Arm(init, spec or InitConfig(), self.fraction, 0, self.count)

    @property
    def key(self) -> str:
        """arms.csv's `labels`: the arm's label key, "50img" or "0.1"."""
        return self.arm("").labels

    @property
    def shown(self) -> str:
        if self.count:
            return str(self.count)
        return "all" if self.fraction == 1.0 else f"{self.fraction:.0%}"


@dataclass(frozen=True)
class Predictions:
    """One arm's scores on a split: labels (N,), class probabilities (N, K) and logits (N, K)."""

    y: np.ndarray
    probs: np.ndarray
    logits: np.ndarray

    def __getitem__(self, idx: np.ndarray) -> Predictions:
        """The images `idx` (a bootstrap resample)."""
        return Predictions(self.y[idx], self.probs[idx], self.logits[idx])


Metric = Callable[[np.ndarray, Predictions], float]  # (labels of a resample, the resample's predictions)


def study_metrics(cfg: ExperimentConfig, *, logit_referable: bool = False) -> dict[str, Metric]:
    """The compared metrics, the primary first: referable-DR AUC (summed probabilities), quadratic kappa,
    macro AUC; with `logit_referable`, also the second seed's referable AUC from summed logits."""
    threshold = cfg.finetune.referable_threshold

    def referable_auc(y: np.ndarray, p: Predictions) -> float:
        ref = referable_probability(p.probs, threshold)
        return auc_score(referable(y, threshold), np.stack([1 - ref, ref], axis=1))

    metrics: dict[str, Metric] = {  # each on its own (the bootstrap calls them thousands of times)
        "referable_auc": referable_auc,
        "kappa": lambda y, p: quadratic_kappa(y, p.probs.argmax(axis=1), p.probs.shape[1]),
        "auc": lambda y, p: auc_score(y, p.probs),
    }
    if logit_referable:
        metrics["referable_auc_logits"] = lambda y, p: logit_referable_auc(y, p.logits, threshold)
    return metrics


def logit_referable_auc(y: np.ndarray, logits: np.ndarray, threshold: int) -> float:
    """AUC of the summed-logits P(referable) (`referable_logit_probability`)."""
    p = referable_logit_probability(logits, threshold)
    return auc_score(referable(y, threshold), np.stack([1 - p, p], axis=1))


def run_arms(
    cfg: ExperimentConfig,
    cohort: Cohort,
    inits: dict[str, InitConfig],
    amounts: list[Amount],
    out: Path,
    *,
    resume: bool,
) -> pd.DataFrame:
    """Train and score every (seed, amount, init) arm not in out/arms.csv yet; returns all arms' rows."""
    arms_csv = out / "arms.csv"
    done = pd.read_csv(arms_csv, dtype={"labels": str}) if resume and arms_csv.exists() else pd.DataFrame()
    rows = done.to_dict("records")
    device = configure_torch(cfg)
    for seed in cfg.study.seeds:
        seeded = cfg.model_copy(update={"seed": seed})
        folds = assign_folds(cohort.dev, cohort.column, cfg.finetune.folds, seed)
        study = Study(seeded, cohort, folds, device, out / f"seed{seed}")
        for amount in amounts:
            for name, init in inits.items():
                if _finished(done, seed, amount.key, name):
                    continue
                log.info("seed %d, %s labels, %s", seed, amount.shown, name)
                scored = run_arm(study, amount.arm(name, init))
                rows += [r | {"seed": seed, "labels": amount.key} for r in scored]
                atomic_write_text(arms_csv, pd.DataFrame(rows).to_csv(index=False))
    return pd.DataFrame(rows).astype({"labels": str})


def differences(
    cfg: ExperimentConfig,
    out: Path,
    inits: list[str],
    amounts: list[Amount],
    metrics: dict[str, Metric],
    split: str = "test",
) -> pd.DataFrame:
    """Per amount and init: the seeds' mean of (init - study.compare_to) on `split`, paired 95% CI."""
    pairs = [(name, cfg.study.compare_to) for name in inits if name != cfg.study.compare_to]
    return differences_versus(cfg, out, pairs, amounts, metrics, split)


def differences_versus(
    cfg: ExperimentConfig,
    out: Path,
    pairs: list[tuple[str, str]],
    amounts: list[Amount],
    metrics: dict[str, Metric],
    split: str = "test",
) -> pd.DataFrame:
    """Per amount and (init, reference) pair: the seeds' mean of (init - reference) on `split`, its 95% CI
    drawn over the test images with the fine-tuning seeds paired."""
    rows = []
    for amount in amounts:
        named = dict.fromkeys(n for pair in pairs for n in pair)  # each init's predictions read once
        runs = {n: _runs(cfg, out, amount, [n], split) for n in named}
        for name, ref in pairs:
            rows.append(_difference(cfg, amount, name, ref, runs[ref], runs[name], metrics, split))
    return pd.DataFrame(rows)


def pooled_differences(
    cfg: ExperimentConfig,
    out: Path,
    label: str,
    inits: list[str],
    amounts: list[Amount],
    metrics: dict[str, Metric],
    split: str = "test",
    references: list[str] | None = None,
    versus: str | None = None,
) -> pd.DataFrame:
    """Per amount: the mean of (init - reference) over `inits` (one per pretraining seed, each paired with
    the init of the same place in `references`, by default `study.compare_to`) and the fine-tuning seeds,
    named `label` (versus `versus`), its 95% CI drawn over the images, the pretraining seeds and the
    fine-tuning seeds together (`paired_difference_ci`'s seeds grid): the encoder's own variance counts."""
    s = cfg.study
    refs = references or [s.compare_to] * len(inits)
    rows = []
    for amount in amounts:
        reference, runs = (_runs(cfg, out, amount, names, split) for names in (refs, inits))
        grid = (len(inits), len(s.seeds))
        row = _difference(cfg, amount, label, versus or s.compare_to, reference, runs, metrics, split, grid)
        rows.append(row | {"pretrain_seeds": len(inits)})
    return pd.DataFrame(rows)


def _runs(
    cfg: ExperimentConfig, out: Path, amount: Amount, inits: list[str], split: str
) -> list[Predictions]:
    """The predictions of `inits` at `amount`, init-major, the fine-tuning seeds within."""
    return [predictions(out, seed, amount.arm(n), split) for n in inits for seed in cfg.study.seeds]


def _difference(
    cfg: ExperimentConfig,
    amount: Amount,
    name: str,
    versus: str,
    reference: list[Predictions],
    runs: list[Predictions],
    metrics: dict[str, Metric],
    split: str,
    grid: tuple[int, int] | None = None,
) -> dict:
    """One row of differences: each metric's mean paired difference with its bootstrap interval."""
    row = {"labels": amount.key, "init": name, "versus": versus, "split": split}
    for key, metric in metrics.items():
        point, low, high = paired_difference_ci(
            reference[0].y,
            reference,
            runs,
            metric,
            rounds=cfg.finetune.bootstrap,
            seed=derive_seed(cfg.seed, "study-bootstrap", amount.key),
            seeds_grid=grid,
        )
        row |= {key: point, f"{key}_low": low, f"{key}_high": high}
    return row | {"seeds": len(cfg.study.seeds)}


def predictions(out: Path, seed: int, arm: Arm, split: str) -> Predictions:
    with np.load(
        out / f"seed{seed}" / "predictions" / split / f"{arm.name}.npz", allow_pickle=False
    ) as saved:
        return Predictions(saved["y_true"], saved["probs"], saved["logits"])


def means_table(arms: pd.DataFrame, amounts: list[Amount], keys: list[str], split: str = "test") -> list[str]:
    """Markdown rows: mean ± std over seeds of `keys` per amount and init, on `split` (only the amounts
    asked: a resumed study may hold arms of label counts its config no longer lists)."""
    shown = {a.key: a.shown for a in amounts}
    rows = arms[(arms["split"] == split) & arms["labels"].isin(list(shown))]
    lines = [
        "| labels | init | seeds | train images | " + " | ".join(keys) + " |",
        "|---|---|---|---|" + "---|" * len(keys),
    ]
    for (labels, init), g in rows.groupby(["labels", "init"], sort=False):
        cells = [_mean_std(g[k]) for k in keys]
        lines.append(
            f"| {shown[labels]} | {init} | {len(g)} | {g['train_images'].mean():.0f} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def differences_table(diffs: pd.DataFrame, amounts: list[Amount], keys: list[str]) -> list[str]:
    """Markdown rows: each difference with its 95% interval."""
    shown = {a.key: a.shown for a in amounts}
    lines = [
        "| labels | difference | " + " | ".join(f"Δ {k}" for k in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for r in diffs.to_dict("records"):
        cells = [f"{r[k]:+.3f} [{r[f'{k}_low']:+.3f}, {r[f'{k}_high']:+.3f}]" for k in keys]
        lines.append(f"| {shown[r['labels']]} | {r['init']} − {r['versus']} | " + " | ".join(cells) + " |")
    return lines


def arm_metrics(arms: pd.DataFrame, out: Path, metrics: dict[str, Metric], splits: list[str]) -> pd.DataFrame:
    """`arms` with a column per metric of `metrics` missing from it, computed from the saved predictions."""
    extra = [k for k in metrics if k not in arms]
    if not extra:
        return arms
    arms = arms.copy()
    for i, r in arms.iterrows():
        if r["split"] not in splits:
            continue
        amount = Amount(int(r["count"]), float(r["fraction"]))
        p = predictions(out, int(r["seed"]), amount.arm(str(r["init"])), str(r["split"]))
        for key in extra:
            arms.loc[i, key] = metrics[key](p.y, p)
    return arms


def _mean_std(values: pd.Series) -> str:
    """mean ± std over seeds; the mean alone for one seed."""
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values.mean():.3f}"


def _finished(done: pd.DataFrame, seed: int, labels: str, init: str) -> bool:
    if done.empty:
        return False
    return bool(((done["seed"] == seed) & (done["labels"] == labels) & (done["init"] == init)).any())
