"""`fedretina analyze relevance` (Fig 5): LRP heatmaps of the severe-DR logit (`shared.analysis.lrp`)
of each fine-tuned DR model, scored against IDRiD's lesion masks (microaneurysms, haemorrhages, hard
exudates and their union; `lesions`) beside a Gaussian-random control."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from shared import plots
from shared.analysis.lrp import (
    CHANNEL_POOLS,
    random_control,
    relevance_map,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
)
from shared.config import ExperimentConfig
from shared.device import configure_torch
from shared.errors import CheckpointError, ConfigError
from shared.logs import progress
from shared.rundir import Report, atomic_write_text
from shared.seeding import derive_seed
from shared.spark.sparse import MaskedGroupNorm
from simulation.analysis.images import index_batches, model_inputs, open_site
from simulation.analysis.lesions import UNION, LesionImage, lesion_image, segmentation_rows
from simulation.analysis.models import TASK, load_models, parse_models
from simulation.analysis.outputs import markdown, start_analysis_dir

SEVERE_DR = 4  # the grade whose logit the heatmaps explain (proliferative DR, the paper's "severe")
CONTROL_DRAWS = 16  # Gaussian heatmaps averaged per image for the random control


def run_relevance(
    cfg: ExperimentConfig,
    models: Sequence[str],
    site_yaml: Path,
    *,
    split: str | None = None,
    images: int | None = None,
    target_class: int = SEVERE_DR,
    figures: int = 4,
) -> Report:
    """`fedretina analyze relevance`: writes relevance.csv (model, image_id, pooling, lesion, rma, rra,
    control_rma, control_rra, mask_fraction), relevance.md (means per model, pooling and lesion beside
    the control) and examples.png (`figures` images: the image, its lesion union, each model's heatmap)."""
    device = configure_torch(cfg)
    paths = parse_models(models)
    nets = load_models(models, device, task=TASK, size=cfg.finetune_image_size)
    for name, model in nets.items():
        _check_lrp(name, paths[name], model, target_class)
    cfg, site = open_site(cfg, site_yaml)
    rows = segmentation_rows(site, split, images)
    out = start_analysis_dir(cfg, "relevance")
    size = cfg.finetune_image_size
    records, examples = [], []
    for batch in progress(list(index_batches(len(rows), cfg.finetune.batch_size)), "relevance"):
        lesion_images = [lesion_image(row, size) for row in rows.iloc[batch].to_dict("records")]
        x = model_inputs([li.rgb for li in lesion_images])
        controls = [control_scores(li, cfg.seed) for li in lesion_images]
        heatmaps = {name: relevance_map(model, x, TASK, target_class) for name, model in nets.items()}
        for j, li in enumerate(lesion_images):
            for name, maps in heatmaps.items():
                records += _image_scores(
                    name, li, {pool: maps[pool][j] for pool in CHANNEL_POOLS}, controls[j]
                )
            union = li.masks[UNION]
            if len(examples) < figures and union is not None and union.any():
                examples.append((li.image_id, li.rgb, union, {n: m["sum"][j] for n, m in heatmaps.items()}))
    table = pd.DataFrame(records)
    atomic_write_text(out / "relevance.csv", table.to_csv(index=False))
    summary = relevance_summary(table)
    atomic_write_text(out / "relevance.md", summary)
    if examples:
        plots.relevance_examples(
            out / "examples.png",
            examples,
            title=f"LRP of DR grade {target_class}, channels summed (red: evidence for it, blue: against)",
        )
    return Report(out, summary)


def control_scores(image: LesionImage, seed: int) -> dict[str, tuple[float, float]]:
    """{lesion: (relevance mass accuracy, rank accuracy)} of Gaussian heatmaps, averaged over
    `CONTROL_DRAWS` draws seeded by (seed, image id): the chance level (the mask's area fraction)."""
    rng = np.random.default_rng(derive_seed(seed, "relevance-control", image.image_id))
    size = image.rgb.shape[:2]
    draws = [random_control(size, rng) for _ in range(CONTROL_DRAWS)]
    out = {}
    for lesion, mask in image.masks.items():
        if mask is None or not mask.any():
            out[lesion] = (math.nan, math.nan)
            continue
        rma = np.mean([relevance_mass_accuracy(h, mask) for h in draws])
        rra = np.mean([relevance_rank_accuracy(h, mask) for h in draws])
        out[lesion] = (float(rma), float(rra))
    return out


def relevance_summary(table: pd.DataFrame) -> str:
    """Markdown: mean scores per model, pooling and lesion beside the random control's, over the images
    annotated with that lesion (`images`); the relevance mass accuracy's mean skips heatmaps with no
    positive relevance (`rma_images` counts the others: with the sum pooling, an image whose target logit
    is negative has none)."""
    scores = ["rma", "rra", "control_rma", "control_rra", "mask_fraction"]
    grouped = table.groupby(["model", "pooling", "lesion"], sort=False)
    means = grouped[scores].mean().reset_index()
    means.insert(3, "images", grouped["mask_fraction"].count().to_numpy())
    means.insert(4, "rma_images", grouped["rma"].count().to_numpy())
    return markdown(means, "{:.3f}")


def _image_scores(
    model: str, image: LesionImage, heatmaps: dict[str, np.ndarray], control: dict[str, tuple[float, float]]
) -> list[dict]:
    records = []
    for pooling, heatmap in heatmaps.items():
        for lesion, mask in image.masks.items():
            present = mask is not None
            records.append(
                {
                    "model": model,
                    "image_id": image.image_id,
                    "pooling": pooling,
                    "lesion": lesion,
                    "rma": relevance_mass_accuracy(heatmap, mask) if present else math.nan,
                    "rra": relevance_rank_accuracy(heatmap, mask) if present else math.nan,
                    "control_rma": control[lesion][0],
                    "control_rra": control[lesion][1],
                    "mask_fraction": float(mask.mean()) if present else math.nan,
                }
            )
    return records


def _check_lrp(name: str, path: Path, model: nn.Module, target_class: int) -> None:
    classes = model.heads[TASK][1].out_channels
    if not 0 <= target_class < classes:
        raise ConfigError(f"--target-class {target_class}: the {TASK} head has classes 0..{classes - 1}")
    if any(isinstance(m, nn.GroupNorm | MaskedGroupNorm) for m in model.modules()):
        raise CheckpointError(
            f"--model {name}: {path} is a GroupNorm model; LRP needs a BatchNorm model (norm=bn), "
            "zennit has no GroupNorm rule"
        )
