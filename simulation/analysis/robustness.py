"""`fedretina analyze robustness` (Fig 4): the 15 ImageNet-C corruptions at severities 1-5
(`shared.analysis.corruptions`) applied to each image as the model sees it (the cached FOV crop, uint8),
and what they change for each fine-tuned DR model: the correct class's softmax probability, the macro AUC
and the referable-DR AUC."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from shared import plots
from shared.analysis import evaluating
from shared.analysis.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from shared.config import ExperimentConfig
from shared.data.dataset import FundusDataset
from shared.device import configure_torch
from shared.logs import progress
from shared.metrics import evaluate_predictions
from shared.rundir import Report, atomic_write_text
from shared.seeding import derive_seed
from shared.training.data import site_images
from shared.training.finetune import softmax
from simulation.analysis.images import analysis_rows, cached_image, index_batches, model_inputs, open_site
from simulation.analysis.models import TASK, load_models
from simulation.analysis.outputs import markdown, start_analysis_dir


def run_robustness(
    cfg: ExperimentConfig,
    models: Sequence[str],
    site_yaml: Path,
    *,
    split: str | None = "test",
    images: int | None = None,
) -> Report:
    """`fedretina analyze robustness`: writes robustness.csv (one row per model, corruption and severity),
    robustness.md (the changes averaged over severities) and heatmaps: delta_<model>.png for each model and,
    with two models or more, difference_<model>.png (its changes minus the first model's)."""
    device = configure_torch(cfg)
    nets = load_models(models, device, task=TASK, size=cfg.finetune_image_size)
    cfg, site = open_site(cfg, site_yaml)
    rows = analysis_rows(site, split, images, task=TASK)
    out = start_analysis_dir(cfg, "robustness")
    dataset = site_images(site, cfg, cfg.finetune_image_size, "none", rows=rows, task=TASK)
    table = corruption_effects(cfg, nets, dataset)
    atomic_write_text(out / "robustness.csv", table.to_csv(index=False))
    summary = robustness_summary(table)
    atomic_write_text(out / "robustness.md", summary)
    _robustness_plots(out, table, list(nets))
    return Report(out, summary)


def corruption_effects(
    cfg: ExperimentConfig,
    models: dict[str, nn.Module],
    dataset: FundusDataset,
    *,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
) -> pd.DataFrame:
    """One row per (model, corruption, severity): the mean change in the correct class's probability and
    the AUC and referable-DR AUC under the corruption, with their changes from the clean images.

    Image i is corrupted with seed `derive_seed(cfg.seed, image_id, corruption, severity)`; each corrupted
    batch is scored by every model before the next is made, so memory holds one batch of images.
    """
    labels = dataset.labels.numpy()
    clean = _probabilities(cfg, models, dataset, None)
    base = {name: _scores(cfg, labels, probs) for name, probs in clean.items()}
    records = []
    for name in progress(corruptions, "corruptions", total=len(corruptions)):
        for severity in severities:
            probs = _probabilities(cfg, models, dataset, (name, severity))
            for model, p in probs.items():
                scores = _scores(cfg, labels, p)
                correct = np.arange(len(labels)), labels
                records.append(
                    {
                        "model": model,
                        "corruption": name,
                        "severity": severity,
                        "images": len(labels),
                        "correct_prob_change": float(np.mean(p[correct] - clean[model][correct])),
                        "auc": scores["auc"],
                        "auc_change": scores["auc"] - base[model]["auc"],
                        "referable_auc": scores["referable_auc"],
                        "referable_auc_change": scores["referable_auc"] - base[model]["referable_auc"],
                    }
                )
    return pd.DataFrame(records)


def robustness_summary(table: pd.DataFrame) -> str:
    """Markdown: each model's clean AUCs, then per corruption the changes averaged over severities."""
    changes = ["correct_prob_change", "auc_change", "referable_auc_change"]
    lines = []
    for model, g in table.groupby("model", sort=False):
        row = g.iloc[0]
        lines.append(
            f"- {model}: clean AUC {row.auc - row.auc_change:.3f}, clean referable AUC "
            f"{row.referable_auc - row.referable_auc_change:.3f} ({row.images} images)"
        )
    wide = table.pivot_table(index="corruption", columns="model", values=changes, sort=False)
    order = list(dict.fromkeys(table.corruption))
    wide = wide.reindex(order)
    wide.loc["mean"] = wide.mean()
    models = list(dict.fromkeys(table.model))
    short = {"correct_prob_change": "Δp(correct)", "auc_change": "ΔAUC", "referable_auc_change": "Δref AUC"}
    flat = pd.DataFrame({"corruption": wide.index})
    for model in models:
        for change in changes:
            flat[f"{model} {short[change]}"] = wide[(change, model)].to_numpy()
    header = "Changes from the clean images, averaged over severities 1-5:\n\n"
    return "\n".join(lines) + "\n\n" + header + markdown(flat, "{:+.3f}")


def _probabilities(
    cfg: ExperimentConfig,
    models: dict[str, nn.Module],
    dataset: FundusDataset,
    corruption: tuple[str, int] | None,
) -> dict[str, np.ndarray]:
    """{model: class probabilities (N, K)} of the dataset's images, corrupted by (name, severity) or clean."""
    probs: dict[str, list[np.ndarray]] = {name: [] for name in models}
    for batch in index_batches(len(dataset), cfg.finetune.batch_size):
        images = [cached_image(dataset, i) for i in batch]
        if corruption is not None:
            name, severity = corruption
            ids = dataset.rows["image_id"].iloc[batch]
            images = [
                corrupt(image, name, severity, derive_seed(cfg.seed, image_id, name, severity))
                for image, image_id in zip(images, ids, strict=True)
            ]
        x = model_inputs(images)
        for model_name, model in models.items():
            probs[model_name].append(_softmax(model, x))
    return {name: np.concatenate(p) for name, p in probs.items()}


@torch.no_grad()
def _softmax(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    device = next(model.parameters()).device
    with evaluating(model):
        logits = model(x.to(device), TASK)
    return softmax(logits.double().cpu().numpy())


def _scores(cfg: ExperimentConfig, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    return evaluate_predictions(labels, probs, TASK, referable_threshold=cfg.finetune.referable_threshold)


def _robustness_plots(out: Path, table: pd.DataFrame, models: list[str]) -> None:
    titles = {
        "correct_prob_change": "Δ p(correct class)",
        "auc_change": "Δ AUC",
        "referable_auc_change": "Δ referable AUC",
    }

    def grid(model: str, change: str) -> pd.DataFrame:
        g = table[table.model == model]
        grid = g.pivot(index="corruption", columns="severity", values=change)
        return grid.reindex(list(dict.fromkeys(g.corruption)))

    for model in models:
        plots.corruption_heatmaps(
            out / f"delta_{model}.png",
            {titles[c]: grid(model, c) for c in titles},
            title=f"{model}: change under corruption (blue: better than clean)",
        )
    first = models[0]
    for model in models[1:]:
        plots.corruption_heatmaps(
            out / f"difference_{model}.png",
            {titles[c]: grid(model, c) - grid(first, c) for c in titles},
            title=f"{model} minus {first} (blue: {model} degrades less)",
        )
