"""The images an analysis reads: a site's rows of one split, its cached FOV crops, and the normalised inputs
the models see (what the dataset's unaugmented "none" recipe makes of them)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from shared.config import ExperimentConfig
from shared.data.dataset import FundusDataset
from shared.data.fundus import preprocess
from shared.data.labels import label_column
from shared.data.manifest import labelled
from shared.data.site import Site
from shared.data.transforms import FUNDUS_MEAN, FUNDUS_STD, normalise
from shared.errors import ConfigError
from shared.training.data import load_sites


def open_site(cfg: ExperimentConfig, site_yaml: Path) -> tuple[ExperimentConfig, Site]:
    """The one site analysed, recorded as the run's only site."""
    cfg = cfg.model_copy(update={"sites": (str(site_yaml.resolve()),)})
    return cfg, load_sites(cfg.sites)[0]


def analysis_rows(
    site: Site, split: str | None, limit: int | None, *, task: str | None = None
) -> pd.DataFrame:
    """The site's rows of `split` (all when None), labelled for `task` when given, sorted by image id,
    the first `limit` of them (all when None)."""
    rows = site.rows if split is None else site.rows[site.rows["split"] == split]
    splits = sorted(s or "(none)" for s in set(site.rows["split"]))
    if rows.empty:
        raise ConfigError(
            f"--split {split}: site {site.name} has no images in that split (its splits: {', '.join(splits)})"
        )
    if task is not None:
        rows = labelled(rows, task)
        if rows.empty:
            raise ConfigError(
                f"--split {split}: site {site.name} has no {label_column(task)} labels there; "
                f"this analysis needs graded images"
            )
    rows = rows.sort_values("image_id", kind="stable")
    return rows.head(limit) if limit else rows


def model_inputs(images: Sequence[np.ndarray]) -> torch.Tensor:
    """(B, 3, S, S) float inputs, normalised as the models were trained, from (S, S, 3) uint8 images: what
    the dataset's "none" recipe makes of the cached crop."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return normalise(x, FUNDUS_MEAN, FUNDUS_STD)


def cached_image(dataset: FundusDataset, i: int) -> np.ndarray:
    """Image `i` of an unaugmented dataset as (S, S, 3) uint8: its FOV crop from the site's cache."""
    row = dataset.rows.iloc[i]
    if dataset.cache is not None:
        return np.array(dataset.cache.get(row.image_id)[0])
    return preprocess(Path(row.path), dataset.size).rgb


def index_batches(n: int, size: int) -> Iterator[list[int]]:
    """Indices 0..n-1 in consecutive batches of `size` (the last one shorter)."""
    for start in range(0, n, size):
        yield list(range(start, min(start + size, n)))
