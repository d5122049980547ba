"""Small figures people would rather look at than read: training curves, ROC and confusion plots, and the
analyses' figures (activation spectra, corruption heatmaps, relevance heatmaps)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the headless backend
import numpy as np
import pandas as pd
from matplotlib.ticker import NullFormatter
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


def curve_panels(
    path: Path,
    panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]],
    *,
    xlabel: str,
    title: str,
) -> None:
    """One panel per metric (its name -> series label -> (x, y)), side by side, one legend; series whose
    label starts with `local:` dashed (the sites alone, beside the arms that pool them)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), dpi=120, squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items(), strict=True):
        for label, (x, y) in series.items():
            style = "--" if label.startswith("local:") else "-"
            ax.plot(x, y, style, marker="o", markersize=2.5, label=label)
        ax.set(xlabel=xlabel, ylabel=name)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08 + 0.05 * (len(labels) // 5), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


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
    counts = sorted(arms.groupby("labels")["train_images"].mean().unique())  # label the measured counts only
    ax.set_xticks(counts, [f"{c:.0f}" for c in counts])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def condition_numbers(path: Path, table: pd.DataFrame, *, title: str) -> None:
    """Percentile condition number per layer (log scale), one line per model: `table` has one row per layer
    (its index, in forward order) and one column per model (the second seed's Fig 3a). Infinite values (a
    null 10th-percentile eigenvalue) are triangles on the top edge, outside the line."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    x = np.arange(1, len(table) + 1)
    top = ax.get_xaxis_transform()  # x in data, y in axes coordinates
    infinite = False
    for i, model in enumerate(table.columns):
        values = table[model].to_numpy(dtype=np.float64)
        ax.plot(x, np.where(np.isfinite(values), values, np.nan), marker="o", markersize=3, label=model)
        up = np.isposinf(values)
        infinite |= bool(up.any())
        ax.plot(x[up], np.full(up.sum(), 0.98 - 0.03 * i), "^", color=f"C{i}", markersize=4, transform=top)
    if infinite:
        ax.plot([], [], "^", color="grey", markersize=4, label="infinite")
    ax.set(yscale="log", xlabel="layer", ylabel="λ90 / λ10", title=title)
    ax.set_xticks(x, [str(name) for name in table.index], rotation=60, ha="right", fontsize=6)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def eigen_densities(
    path: Path,
    densities: dict[str, tuple[np.ndarray, np.ndarray]],
    fits: dict[str, tuple[float, float]],
    *,
    title: str,
) -> None:
    """Eigenvalue densities on log-log axes, one colour per model: `densities` = {model: (bin edges,
    density)} as markers at the bins' geometric centres, `fits` = {model: (b, scale)} as the fitted Pareto
    pdf b * scale^b / x^(b+1) over the same range (the second seed's Fig 3b)."""
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for i, (model, (edges, density)) in enumerate(densities.items()):
        colour = f"C{i}"
        centres = np.sqrt(edges[1:] * edges[:-1])
        shown = density > 0
        ax.plot(centres[shown], density[shown], "o", color=colour, markersize=3, alpha=0.8)
        if model in fits:
            b, scale = fits[model]
            x = np.geomspace(max(edges[0], scale), edges[-1], 100)
            ax.plot(x, b * scale**b / x ** (b + 1), color=colour, label=f"{model} (Pareto b = {b:.2f})")
    ax.set(xscale="log", yscale="log", xlabel="eigenvalue", ylabel="density", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def corruption_heatmaps(path: Path, panels: dict[str, pd.DataFrame], *, title: str) -> None:
    """Side-by-side corruption x severity heatmaps, one per panel (title -> grid with corruptions as rows
    and severities as columns), each on a diverging scale centred at 0 (blue positive), values printed."""
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 2.7 * len(panels), 5.2), dpi=120, squeeze=False)
    for k, (ax, (name, grid)) in enumerate(zip(axes[0], panels.items(), strict=True)):
        values = grid.to_numpy(dtype=np.float64)
        limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.0
        image = ax.imshow(values, cmap="RdBu", vmin=-(limit or 1e-9), vmax=limit or 1e-9, aspect="auto")
        for (i, j), value in np.ndenumerate(values):
            text = "n/a" if np.isnan(value) else f"{value:+.3f}"
            dark = np.isfinite(value) and abs(value) > 0.6 * limit
            ax.text(j, i, text, ha="center", va="center", fontsize=5, color="white" if dark else "black")
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns], fontsize=7)
        names = [str(r).replace("_", " ") for r in grid.index] if k == 0 else []
        ax.set_yticks(range(grid.shape[0]), names, fontsize=7)
        ax.set(xlabel="severity", title=name)
        fig.colorbar(image, ax=ax, fraction=0.06, pad=0.02).ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def relevance_examples(
    path: Path,
    rows: list[tuple[str, np.ndarray, np.ndarray, dict[str, np.ndarray]]],
    *,
    title: str,
) -> None:
    """One row per image: the image, the image with its lesion union outlined, and each model's heatmap on
    a diverging scale centred at 0 (red: evidence for the class; limits at the 99.5th percentile of |R|,
    so a few extreme pixels do not wash the map out) with the outline repeated faintly (Fig 5).
    `rows` = [(image id, rgb (S, S, 3) uint8, union mask (S, S) bool, {model: heatmap (S, S)})]."""
    models = list(rows[0][3])
    cols = 2 + len(models)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.1 * cols, 2.2 * len(rows)), dpi=120, squeeze=False)
    for r, (image_id, rgb, mask, heatmaps) in enumerate(rows):
        axes[r, 0].imshow(rgb)
        axes[r, 0].set_title(image_id, fontsize=7)
        axes[r, 1].imshow(rgb)
        axes[r, 1].contour(mask, levels=[0.5], colors="yellow", linewidths=0.6)
        axes[r, 1].set_title("lesions (MA, HE, EX)", fontsize=7)
        for c, model in enumerate(models, start=2):
            heatmap = heatmaps[model]
            limit = float(np.percentile(np.abs(heatmap), 99.5)) or 1e-12
            axes[r, c].imshow(heatmap, cmap="bwr", vmin=-limit, vmax=limit)
            axes[r, c].contour(mask, levels=[0.5], colors="black", linewidths=0.3, alpha=0.5)
            axes[r, c].set_title(model, fontsize=7)
        for ax in axes[r]:
            ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
