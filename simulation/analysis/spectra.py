"""`fedretina analyze spectra` (Fig 3): each tapped layer's activation spectrum
(`shared.analysis.eigenspectra`: the stem's activation, every block, and nn-MobileNet's pen activation), its
percentile condition number (lambda at the 90th percentile over lambda at the 10th; infinite when over 10% of
the spectrum is null), and a Pareto fit of the first tapped layer's positive eigenvalues. Takes fine-tuned
models and encoder exports alike."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from shared import plots
from shared.analysis.eigenspectra import (
    activation_spectra,
    eigen_density,
    pareto_fit,
    percentile_condition_number,
)
from shared.config import ExperimentConfig
from shared.data.dataset import loader
from shared.device import configure_torch
from shared.logs import progress
from shared.rundir import Report, atomic_write_text
from shared.training.data import site_images
from simulation.analysis.images import analysis_rows, open_site
from simulation.analysis.models import load_models
from simulation.analysis.outputs import markdown, start_analysis_dir

log = logging.getLogger(__name__)


def run_spectra(
    cfg: ExperimentConfig,
    models: Sequence[str],
    site_yaml: Path,
    *,
    split: str | None = "test",
    images: int | None = None,
) -> Report:
    """`fedretina analyze spectra`: writes spectra.csv (model, layer, index, eigenvalue), condition.csv/.md
    (percentile condition number, one row per layer, one column per model), pareto.csv/.md (the first
    tapped layer's Pareto fit per model), condition.png and density.png."""
    device = configure_torch(cfg)
    nets = load_models(models, device, size=cfg.finetune_image_size)
    cfg, site = open_site(cfg, site_yaml)
    rows = analysis_rows(site, split, images)
    out = start_analysis_dir(cfg, "spectra")
    size = cfg.finetune_image_size
    dataset = site_images(site, cfg, size, "none", rows=rows)
    spectra: dict[str, dict[str, np.ndarray]] = {}
    for name, model in progress(nets.items(), "spectra", total=len(nets)):
        batches = (b["image"] for b in loader(dataset, cfg.finetune.batch_size, seed=None, train=False))
        spectra[name] = activation_spectra(model, batches, batch_size=cfg.finetune.batch_size)
        log.info(
            "%s: spectra of %d layers over %d images at %d px", name, len(spectra[name]), len(rows), size
        )
    long = pd.DataFrame(
        [
            {"model": name, "layer": layer, "index": i, "eigenvalue": value}
            for name, layers in spectra.items()
            for layer, values in layers.items()
            for i, value in enumerate(values)
        ]
    )
    condition = condition_table(spectra)
    pareto = pareto_table(spectra)
    atomic_write_text(out / "spectra.csv", long.to_csv(index=False))
    atomic_write_text(out / "condition.csv", condition.to_csv(index=False))
    atomic_write_text(out / "pareto.csv", pareto.to_csv(index=False))
    condition_md = markdown(condition, "{:.4g}")
    pareto_md = markdown(pareto, "{:.4g}")
    atomic_write_text(out / "condition.md", condition_md)
    atomic_write_text(out / "pareto.md", pareto_md)
    plots.condition_numbers(
        out / "condition.png",
        condition.set_index("layer"),
        title=f"percentile condition number (λ90 / λ10), {len(rows)} images",
    )
    first = {name: layers[next(iter(layers))] for name, layers in spectra.items()}
    plots.eigen_densities(
        out / "density.png",
        {name: eigen_density(v, bins=int(np.clip((v > 0).sum() // 4, 5, 30))) for name, v in first.items()},
        {r.model: (r.b, r.scale) for r in pareto.itertuples()},
        title=f"first layer's eigenvalues ({', '.join(sorted(set(pareto.layer)))})",
    )
    return Report(out, f"{condition_md}\n{pareto_md}")


def condition_table(spectra: dict[str, dict[str, np.ndarray]]) -> pd.DataFrame:
    """Percentile condition numbers: one row per layer (in forward order), one column per model."""
    layers = list(dict.fromkeys(layer for layers in spectra.values() for layer in layers))
    return pd.DataFrame(
        {"layer": layers}
        | {
            name: [percentile_condition_number(own[k]) if k in own else math.nan for k in layers]
            for name, own in spectra.items()
        }
    )


def pareto_table(spectra: dict[str, dict[str, np.ndarray]]) -> pd.DataFrame:
    """Each model's first tapped layer: its positive eigenvalues' count and Pareto fit (b, scale, KS test)."""
    records = []
    for name, layers in spectra.items():
        layer, values = next(iter(layers.items()))
        positive = values[values > 0]
        fit = pareto_fit(positive)
        records.append({"model": name, "layer": layer, "eigenvalues": len(positive), **fit._asdict()})
    return pd.DataFrame(records)
