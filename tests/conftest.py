"""Test-wide settings: fixed seeds, a small thread count (CI has 2 cores), and the project root."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FEDRETINA = str(Path(sys.executable).parent / "fedretina")
UID = "0123456789ab"  # a run uid of the server's form (12 hex digits), for specs built by hand


def uid_of(name: str) -> str:
    """A run uid of the server's form, one per name (a site keeps each run's state under its uid)."""
    return hashlib.sha256(name.encode()).hexdigest()[:12]


os.environ.setdefault("PYTHONHASHSEED", "0")
# Under pytest-xdist (`make test` runs three workers on CI's two cores, most tests wait on real processes)
# every process of a worker, its subprocesses included, computes on one thread: torch's default of one per
# core, times three workers, spins OpenMP threads against each other.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
if THREADS == 1:
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"


@pytest.fixture(autouse=True)
def _seeded() -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(THREADS)


def write_site(
    root: Path,
    fmt: str,
    count: int,
    *,
    seed: int = 0,
    height: int = 96,
    styles: tuple[str, ...] = ("topcon",),
    **extra: int,
) -> Path:
    """Render a small synthetic dataset in `fmt`'s real layout under `root` and write its site YAML beside it.

    Returns the YAML path. Uses the same writers as `fedretina synth`.
    """
    from shared.data.synth.layouts import WRITERS, render_jobs

    data = root / fmt
    render_jobs(WRITERS[fmt](data, count, seed, height, styles, **extra), workers=1)
    return site_yaml(root, fmt, data)


def site_yaml(root: Path, fmt: str, data: Path) -> Path:
    """`root/<fmt>.yaml` for a dataset in `data`, with its state under `root/state/<fmt>`."""
    import yaml

    options = {"ukb": {"outcomes": "outcomes.csv"}}.get(fmt, {})
    site = {
        "name": fmt,
        "format": fmt,
        "root": str(data.resolve()),
        "state_dir": str((root / "state" / fmt).resolve()),
        "options": options,
    }
    path = root / f"{fmt}.yaml"
    path.write_text(yaml.safe_dump(site))
    return path


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small synthetic site per format (rendered once per test session), by format name."""
    root = tmp_path_factory.mktemp("sites")
    counts = {"eyepacs": 10, "mmac": 20, "ukb": 8, "messidor2": 6, "aptos": 15, "folder": 12}
    sites = {fmt: write_site(root, fmt, n) for fmt, n in counts.items()}
    sites["idrid"] = write_site(root, "idrid", 6, grading_images=10)
    return sites
