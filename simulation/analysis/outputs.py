"""What an analysis command leaves: its folder, runs/NAME/analysis/<analysis>/, and a markdown summary that
is written there and printed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from shared.config import ExperimentConfig
from shared.rundir import start_run_dir

PART = "analysis"  # runs/NAME/analysis/<analysis>/


def start_analysis_dir(cfg: ExperimentConfig, analysis: str) -> Path:
    """The run folder of `analysis` ("spectra", "robustness", "relevance"), started as every run's is."""
    return start_run_dir(cfg, f"{PART}/{analysis}")


def markdown(table: pd.DataFrame, number: str = "{:.3f}") -> str:
    """A markdown table; floats through the `number` format, NaN as "n/a"."""

    def cell(value: object) -> str:
        if isinstance(value, float | np.floating):
            if math.isnan(value):
                return "n/a"
            return "inf" if math.isinf(value) else number.format(value)
        return str(value)

    lines = [
        "| " + " | ".join(map(str, table.columns)) + " |",
        "|" + "---|" * len(table.columns),
        *("| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)),
    ]
    return "\n".join(lines) + "\n"
