"""Fixtures shared by the whole-command tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import write_site


@pytest.fixture(scope="session")
def eyepacs40(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-image EyePACS-like site at 96 px, one camera: enough patients for label subsets and a test split
    (rendered once for both studies' tests)."""
    return write_site(
        tmp_path_factory.mktemp("eyepacs40"), "eyepacs", 40, seed=3, height=96, styles=("eyepacs-mixed-a",)
    )
