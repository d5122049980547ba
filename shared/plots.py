"""Small figures people would rather look at than read: training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the headless backend
import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve


def curve(path: Path, series: dict[str, Sequence[float]], *, xlabel: str, ylabel: str, title: str) -> None:
    """Line plot of one or more series against 1..n, written as PNG."""
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for label, values in series.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    _save(fig, path)


def roc_plot(path: Path, y_true: np.ndarray, probs: np.ndarray, *, title: str) -> None:
    """One-vs-rest ROC curve per class (binary tasks: the positive class), with each AUC in the legend."""
    k = probs.shape[1]
    classes = [1] if k == 2 else list(range(k))
    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=120)
    for c in classes:
        positives = y_true == c
        if positives.all() or not positives.any():
            continue
        fpr, tpr, _ = roc_curve(positives, probs[:, c])
        ax.plot(fpr, tpr, label=f"class {c} (AUC {roc_auc_score(positives, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def confusion_plot(path: Path, y_true: np.ndarray, probs: np.ndarray, *, title: str) -> None:
    k = probs.shape[1]
    matrix = confusion_matrix(y_true, probs.argmax(1), labels=list(range(k)))
    fig, ax = plt.subplots(figsize=(3.8, 3.4), dpi=120)
    ax.imshow(matrix, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                int(matrix[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if matrix[i, j] > matrix.max() / 2 else "black",
            )
    ax.set(xlabel="predicted", ylabel="true", title=title, xticks=range(k), yticks=range(k))
    _save(fig, path)


def auc_vs_fraction(path: Path, results: list[dict], *, title: str) -> None:
    """Mean CV AUC (error bars: std over folds) against the label fraction, one line per initialisation."""
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    for init in dict.fromkeys(r["init"] for r in results):
        rows = sorted((r for r in results if r["init"] == init), key=lambda r: r["fraction"])
        x = [r["fraction"] for r in rows]
        mean = [r["metrics"]["auc"]["mean"] for r in rows]
        std = [np.nan_to_num(r["metrics"]["auc"]["std"]) for r in rows]
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=init)
    ax.set(xscale="log", xlabel="fraction of training labels", ylabel="AUC", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def metric_vs_labels(path: Path, arms: pd.DataFrame, metric: str, *, title: str) -> None:
    """Mean `metric` (error bars: std over seeds) against the labelled images an arm trained on, one line per
    initialisation; `arms` holds one row per (init, labels, seed)."""
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    for init, g in arms.groupby("init", sort=False):
        stats = g.groupby("labels", sort=False).agg(
            n=("train_images", "mean"), m=(metric, "mean"), s=(metric, "std")
        )
        stats = stats.sort_values("n")
        ax.errorbar(stats["n"], stats["m"], yerr=stats["s"].fillna(0), marker="o", capsize=3, label=init)
    ax.set(xscale="log", xlabel="labelled training images", ylabel=metric.replace("_", " "), title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)
