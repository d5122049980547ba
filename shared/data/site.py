"""A site as training sees it: its YAML (`shared/data/site_config.py`) and its checked images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from shared.data.checks import load_checked_manifest
from shared.data.site_config import SiteConfig, load_site_config


@dataclass(frozen=True)
class Site:
    """A site as training sees it: a name, the real site's config (its cache, its state) and its images.

    A scenario's virtual site (part of a split) shares the source's config and cache but has its own name,
    rows and state folder.
    """

    name: str
    config: SiteConfig
    rows: pd.DataFrame

    @property
    def federation_dir(self) -> Path:
        """Where this (possibly virtual) site keeps its federated runs' state (see client/state.py)."""
        base = self.config.state_root / "federation"
        return base if self.name == self.config.name else base / self.name

    @property
    def ledger_path(self) -> Path:
        """The privacy ledger of this site's dataset: one per dataset, shared by every run and every
        simulated part of it; each release names the patients it used (`shared/privacy/ledger.py`)."""
        return self.config.privacy_dir / f"{self.config.name}.jsonl"


def load_site(path: str | Path) -> Site:
    """A site YAML and its usable images (its last check's manifest), ready for training."""
    config = load_site_config(path)
    return Site(config.name, config, load_checked_manifest(config))
