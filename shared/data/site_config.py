"""A site's YAML: which dataset format it holds, where, where its private state lives, its privacy budget
and what a server may ask of it. Loading it validates it (`load_site_config`); `shared/data/site.py` adds
the site's checked images.

Example (`sites/templates/eyepacs.yaml`):

    name: eyepacs
    format: eyepacs
    root: /data/eyepacs          # relative paths are resolved against this YAML's folder
    options: {labels: trainLabels.csv}
    state_dir: /var/lib/fedretina/eyepacs   # default: $XDG_STATE_HOME/fedretina/sites/<name>, never in root

The state directory holds everything the site keeps for itself between rounds and runs (check reports,
the preprocessed-image cache, optimiser state, the privacy ledger). Nothing in it is ever sent.

A site that trains privately sets its own budget (defaults shown):

    privacy: {target_epsilon: 8.0, delta: 1.0e-5}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from shared.config import Budget, Strict, read_yaml, validate
from shared.data.formats import FORMATS
from shared.errors import ConfigError
from shared.names import SITE_NAME


class SiteLimits(Strict):
    """The most a round may ask of this site (a server's config is checked against it, `client/limits.py`):
    the defaults admit the paper profile on a GPU box; a hospital may lower them."""

    image_size: int = Field(1024, ge=32)  # pretraining and fine-tuning input side
    batch_size: int = Field(512, ge=1)
    width_mult: float = Field(4.0, gt=0)  # nn-MobileNet's (the paper's encoder is 3.0)
    decoder_width: int = Field(2048, ge=1)
    local_epochs: int = Field(50, ge=1)
    local_steps: int = Field(100_000, ge=1)
    workers: int = Field(16, ge=0)  # data-loading processes
    threads: int = Field(os.cpu_count() or 1, ge=1)  # torch's CPU threads


class SiteConfig(Strict):
    name: str
    format: str
    root: Path
    options: dict[str, Any] = Field(default_factory=dict)
    state_dir: Path | None = None
    # Refuse the site when more than this fraction of its images had to be excluded.
    max_excluded_fraction: float = Field(0.1, ge=0, le=1)
    # This site's own privacy budget over every private run it ever joins (the hospital decides).
    privacy: Budget = Budget()
    # Devices this site trains on at once (data parallel, one process each: GPUs, or CPU processes sharing
    # the cores); shared/training/replicas.py, docs/scale.md.
    devices: int = Field(1, ge=1, le=64)
    limits: SiteLimits = SiteLimits()
    source: Path | None = None  # the YAML this came from (set by the loader)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SITE_NAME.fullmatch(v):
            raise ValueError("use lower-case letters, digits, '-' or '_' (at most 48), e.g. 'eyepacs-a'")
        return v

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v not in FORMATS:
            raise ValueError(f"unknown format {v!r}; known formats: {', '.join(sorted(FORMATS))}")
        return v

    @property
    def state_root(self) -> Path:
        """The site's own folder: check/ (reports), cache/ (preprocessed images), federation/ (run state),
        daemon/ (the site daemon's log and Flower's home). Never inside the dataset, which may be read-only:
        by default `$XDG_STATE_HOME/fedretina/sites/<name>` (`~/.local/state/...`)."""
        if self.state_dir is not None:
            return self.state_dir
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "fedretina" / "sites" / self.name

    @property
    def check_dir(self) -> Path:
        return self.state_root / "check"

    @property
    def cache_dir(self) -> Path:
        return self.state_root / "cache"

    @property
    def privacy_dir(self) -> Path:
        return self.state_root / "privacy"


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site YAML; relative `root`/`state_dir` are taken from the YAML's folder."""
    path = Path(path)
    data = read_yaml(path)
    base = path.parent.resolve()
    for key in ("root", "state_dir"):
        if isinstance(data.get(key), str):
            data[key] = str((base / data[key]).resolve())
    data["source"] = str(path)
    cfg = validate(SiteConfig, data, str(path))
    if not cfg.root.is_dir():
        raise ConfigError(f"{path}: root: {cfg.root} is not a directory; point it at the dataset's folder")
    state, root = cfg.state_root.resolve(), cfg.root.resolve()
    if state.is_relative_to(root) or root.is_relative_to(state):
        raise ConfigError(
            f"{path}: state_dir: {state} and the dataset ({root}) overlap; a site never writes in its "
            "dataset: give a state folder outside it"
        )
    return cfg
