"""Scenarios: which sites a simulated federation has. Partition id i of `flwr run .` is scenario site i.

A scenario YAML (`simulation/scenarios/<name>.yaml`) either lists site YAMLs, each one federation site as it
is (the natural split), or splits one source site into parts by patient (`iid`, `dirichlet`, `camera`).
Site paths inside a scenario are relative to the scenario file. A bare name (`natural`) is looked up in the
app's own `simulation/scenarios/` (found from this package, whatever the working directory: an installed
app copy carries its scenarios with it).

    name: iid-4
    description: the EyePACS-like site dealt at random into 4 sites
    split: {kind: iid, source: ../../sites/generated/eyepacs.yaml, parts: 4}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from shared.config import Strict, read_yaml, validate
from shared.data import partition
from shared.data.cache import ImageCache
from shared.data.checks import load_checked_manifest
from shared.data.labels import label_column
from shared.data.site import Site, load_site
from shared.data.site_config import SiteConfig, load_site_config
from shared.errors import ConfigError

SCENARIO_DIR = Path(__file__).resolve().parents[2] / "simulation" / "scenarios"
COLOUR_SIZE = 64  # image side used for the camera split's colour statistics


class SplitSpec(Strict):
    kind: Literal["iid", "dirichlet", "camera"]
    source: str
    parts: int = Field(4, ge=1)
    alpha: float = Field(0.5, gt=0)  # dirichlet concentration: smaller is more skewed
    task: str = "dr"  # dirichlet: whose labels are skewed


class Scenario(Strict):
    name: str
    description: str = ""
    sites: tuple[str, ...] = ()
    split: SplitSpec | None = None

    @model_validator(mode="after")
    def _one_way(self) -> Scenario:
        if bool(self.sites) == (self.split is not None):
            raise ValueError("give either `sites:` (a list of site YAMLs) or `split:`, not both or neither")
        return self

    @property
    def size(self) -> int:
        return len(self.sites) if self.sites else self.split.parts  # type: ignore[union-attr]


def scenario_path(name: str) -> Path:
    """A scenario name (`natural`) or a path to a scenario YAML."""
    path = Path(name)
    return path if path.suffix in (".yaml", ".yml") else SCENARIO_DIR / f"{name}.yaml"


def load_scenario(name: str) -> Scenario:
    path = scenario_path(name)
    if not path.is_file():
        known = sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml")) if SCENARIO_DIR.is_dir() else []
        raise ConfigError(f"scenario {name!r}: {path} not found; known: {known}")
    scenario = validate(Scenario, read_yaml(path), str(path))

    def beside(entry: str) -> str:  # relative to the scenario file; absolute paths stay as they are
        return os.path.normpath(path.parent / entry)

    sites = tuple(beside(p) for p in scenario.sites)
    split = scenario.split and scenario.split.model_copy(update={"source": beside(scenario.split.source)})
    return scenario.model_copy(update={"sites": sites, "split": split})


def scenario_sites(scenario: Scenario, seed: int, only: int | None = None) -> list[Site]:
    """The federation's sites in partition order; `only` builds just that partition's site (cheaper)."""
    if scenario.sites:
        picks = range(len(scenario.sites)) if only is None else [_index(only, len(scenario.sites))]
        return [load_site(scenario.sites[i]) for i in picks]
    spec = scenario.split
    assert spec is not None
    config = load_site_config(spec.source)
    rows = load_checked_manifest(config)
    if spec.kind == "iid":
        masks = partition.iid(rows, spec.parts, seed)
    elif spec.kind == "dirichlet":
        masks = partition.dirichlet(rows, label_column(spec.task), spec.parts, spec.alpha, seed)
    else:
        masks = partition.camera(rows, _colour(config, rows), spec.parts, seed)
    picks = range(spec.parts) if only is None else [_index(only, spec.parts)]
    return [
        Site(f"{config.name}-{spec.kind}{k}", config, rows[masks[k]].reset_index(drop=True)) for k in picks
    ]


def _index(partition_id: int, size: int) -> int:
    if not 0 <= partition_id < size:
        raise ConfigError(f"partition {partition_id} does not exist: the scenario has {size} sites")
    return partition_id


def _colour(config: SiteConfig, rows: pd.DataFrame) -> np.ndarray:
    """Per image: mean and std of R, G, B inside the FOV, from the site's cache at a small size."""
    cache = ImageCache(config.cache_dir, COLOUR_SIZE)
    cache.ensure(rows)
    feats = []
    for image_id in rows["image_id"]:
        rgb, fov = cache.get(image_id)
        pixels = rgb[fov].astype(np.float32) / 255.0
        feats.append(np.concatenate([pixels.mean(0), pixels.std(0)]))
    return np.array(feats)
