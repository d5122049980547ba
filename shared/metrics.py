"""Evaluation metrics, defined once (on scikit-learn, or equal to it where the bootstraps need speed: AUC and
kappa), with one fixed key schema for every task and site.

Every evaluation returns exactly `metric_keys(task)`; undefined values (AUC with one class present) are NaN,
never missing keys, because Flower's FedAvg ends a run when sites report different metric keys.

- accuracy; AUC (binary, or macro one-vs-rest over classes); quadratic-weighted Cohen's kappa (the DR and
  MMAC grading standard); weighted and macro F1; sensitivity and specificity at the operating point (binary
  tasks: P(positive) >= 0.5); for DR also the referable view: P(referable) = the sum of the referable grades'
  probabilities, with its own AUC, sensitivity and specificity.
- `bootstrap_ci`: percentile 95% interval by resampling images with a seeded generator.

Note: nn-MobileNet's own code reports micro-averaged F1 and "specificity" (both equal accuracy for
single-label data) and a micro AUC; we do not, and say so in the docs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, f1_score, log_loss, recall_score

from shared.data.labels import referable, referable_probability

BASE_KEYS = ("loss", "accuracy", "auc", "kappa", "f1_weighted", "f1_macro", "sensitivity", "specificity")
REFERABLE_KEYS = ("referable_auc", "referable_sensitivity", "referable_specificity")


def metric_keys(task: str) -> tuple[str, ...]:
    return BASE_KEYS + (REFERABLE_KEYS if task == "dr" else ())


def auc_score(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUC on P(class 1), or macro one-vs-rest AUC over the classes present (scikit-learn's
    `roc_auc_score(multi_class="ovr", average="macro")` when all are); NaN when fewer than two are present."""
    y_true = np.asarray(y_true)
    present = np.unique(y_true)
    if len(present) < 2:
        return math.nan
    if probs.shape[1] == 2:
        return _binary_auc(y_true == 1, probs[:, 1])
    return float(np.mean([_binary_auc(y_true == c, probs[:, c]) for c in present]))


def _binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """The area under the ROC curve as the Mann-Whitney statistic (ties count a half, as the trapezoidal
    ROC area does): equal to scikit-learn's, about 20x faster, which the paired bootstraps need (they score
    every run on every resample)."""
    ranks = rankdata(scores)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def quadratic_kappa(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Quadratic-weighted Cohen's kappa (scikit-learn's `cohen_kappa_score(weights="quadratic")`), from the
    confusion matrix; NaN when only one grade occurs in truth and prediction together."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(np.unique(np.concatenate([y_true, y_pred]))) < 2:
        return math.nan
    k = num_classes
    observed = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k).astype(np.float64)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / observed.sum()
    grades = np.arange(k)
    weights = (grades[:, None] - grades[None, :]) ** 2
    return float(1 - (weights * observed).sum() / (weights * expected).sum())


def sensitivity_specificity(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """Recall of the positive class and of the negative class (binary labels)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    sens = (
        float(recall_score(y_true, y_pred, pos_label=1, zero_division=np.nan))
        if (y_true == 1).any()
        else math.nan
    )
    spec = (
        float(recall_score(y_true, y_pred, pos_label=0, zero_division=np.nan))
        if (y_true == 0).any()
        else math.nan
    )
    return sens, spec


def evaluate_predictions(
    y_true: np.ndarray, probs: np.ndarray, task: str, *, referable_threshold: int = 2
) -> dict[str, float]:
    """All metrics of `metric_keys(task)` from labels (N,) and class probabilities (N, K)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    y_pred = probs.argmax(axis=1)
    out = {
        "loss": float(log_loss(y_true, np.clip(probs, 1e-12, 1.0), labels=list(range(k)))),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "auc": auc_score(y_true, probs),
        "kappa": quadratic_kappa(y_true, y_pred, k),
        "f1_weighted": float(
            f1_score(y_true, y_pred, average="weighted", labels=list(range(k)), zero_division=0)
        ),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", labels=list(range(k)), zero_division=0)),
    }
    if k == 2:
        out["sensitivity"], out["specificity"] = sensitivity_specificity(
            y_true, (probs[:, 1] >= 0.5).astype(int)
        )
    else:
        out["sensitivity"], out["specificity"] = math.nan, math.nan
    if task == "dr":
        y_ref = referable(y_true, referable_threshold)
        p_ref = referable_probability(probs, referable_threshold)
        two = np.stack([1 - p_ref, p_ref], axis=1)
        out["referable_auc"] = auc_score(y_ref, two)
        sens, spec = sensitivity_specificity(y_ref, (p_ref >= 0.5).astype(int))
        out["referable_sensitivity"], out["referable_specificity"] = sens, spec
    return {key: out[key] for key in metric_keys(task)}


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float],
    *,
    rounds: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile 95% interval of `metric(y, probs)` over `rounds` resamples of the images (NaNs skipped)."""
    rng = np.random.default_rng(seed)
    n = len(y_true)
    values = []
    for _ in range(rounds):
        idx = rng.integers(0, n, n)
        value = metric(np.asarray(y_true)[idx], np.asarray(probs)[idx])
        if not math.isnan(value):
            values.append(value)
    if not values:
        return math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def mean_std(rows: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Per key, mean and sample standard deviation over folds (NaNs ignored)."""
    out = {}
    for key in rows[0]:
        values = np.array([r[key] for r in rows], dtype=np.float64)
        values = values[~np.isnan(values)]
        out[key] = (
            (float(values.mean()), float(values.std(ddof=1)))
            if len(values) > 1
            else ((float(values[0]), math.nan) if len(values) else (math.nan, math.nan))
        )
    return out


def paired_difference_ci(
    y_true: np.ndarray,
    probs_a: list[np.ndarray],
    probs_b: list[np.ndarray],
    metric: Callable[[np.ndarray, np.ndarray], float],
    *,
    rounds: int = 1000,
    seed: int = 0,
    seeds_grid: tuple[int, int] | None = None,
) -> tuple[float, float, float]:
    """(difference, 2.5%, 97.5%) of mean_s metric(b_s) - metric(a_s) over paired runs s scored on the same
    images: every resample draws the images once and re-scores every run on them. With `seeds_grid`
    (P, S), the runs are a P x S grid in row-major order (pretraining seed x fine-tuning seed) and each
    resample also draws P rows and S columns with replacement, so the interval holds the spread of both
    seeds beside the test set's sampling, not only the images'."""
    grid = seeds_grid or (1, len(probs_a))
    if grid[0] * grid[1] != len(probs_a):
        raise ValueError(f"seeds_grid {grid} does not hold {len(probs_a)} runs")

    def differences(idx: np.ndarray) -> np.ndarray:
        y = np.asarray(y_true)[idx]
        pairs = zip(probs_a, probs_b, strict=True)
        return np.array([metric(y, b[idx]) - metric(y, a[idx]) for a, b in pairs]).reshape(grid)

    def drawn(rng: np.random.Generator) -> float:
        d = differences(rng.integers(0, n, n))
        if seeds_grid is not None:
            d = d[np.ix_(rng.integers(0, grid[0], grid[0]), rng.integers(0, grid[1], grid[1]))]
        return float(d.mean())

    rng = np.random.default_rng(seed)
    n = len(y_true)
    values = [v for _ in range(rounds) if not math.isnan(v := drawn(rng))]
    point = float(differences(np.arange(n)).mean())
    if not values:
        return point, math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return point, float(low), float(high)
