"""From site YAMLs to training datasets: checked manifests, the per-site image cache, pooling."""

from __future__ import annotations

import pandas as pd
from torch.utils.data import ConcatDataset, Dataset

from shared.config import ExperimentConfig
from shared.data.cache import ImageCache
from shared.data.dataset import FundusDataset
from shared.data.site import Site, load_site
from shared.data.transforms import Recipe
from shared.errors import ConfigError


def load_sites(paths: tuple[str, ...] | list[str]) -> list[Site]:
    if not paths:
        raise ConfigError("sites: no site configured; list site YAMLs under `sites:` or pass --site")
    sites = [load_site(p) for p in paths]
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"sites: two site YAMLs share a name ({names}); site names must be unique")
    return sites


def site_images(
    site: Site,
    cfg: ExperimentConfig,
    size: int,
    recipe: Recipe,
    *,
    rows: pd.DataFrame | None = None,
    task: str | None = None,
    workers: int = 2,
) -> FundusDataset:
    """`rows` of a site (default: all its images) as a dataset, with the site's cache filled first."""
    rows = site.rows if rows is None else rows
    cache = None
    if cfg.data.cache:
        cache = ImageCache(site.config.cache_dir, size)
        cache.ensure(rows, workers)
    return FundusDataset(rows, size, recipe, task=task, cache=cache)


def data_key(sites: list[Site]) -> str:
    """The name of pooled data in its random streams: the sorted site names joined by "+", so one site
    holding everything draws exactly what that site draws in a federation."""
    return "+".join(sorted(s.name for s in sites))


def pooled(datasets: list[Dataset]) -> Dataset:
    return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
