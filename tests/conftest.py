"""Test-wide settings: fixed seeds, a small thread count (CI has 2 cores), and the project root."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FEDRETINA = str(Path(sys.executable).parent / "fedretina")
os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
