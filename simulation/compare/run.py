"""`fedretina compare`: plan the arms, train each one not finished yet (reusing any finished arm of the same
settings), then write the report under runs/NAME/compare/. Run it again after an interruption: finished arms
are reused, so it continues where it stopped."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from server.dashboard.data import CENTRALISED_CURVE
from shared.config import ExperimentConfig
from shared.data.labels import label_column
from shared.data.scenario import load_scenario, scenario_sites
from shared.rundir import atomic_write_text, start_run_dir
from shared.training.finetune import finetune_split
from simulation.compare.arms import CENTRALISED, FEDERATED, CompareArm, plan_arms, run_compare_arm
from simulation.compare.report import write_report

log = logging.getLogger(__name__)
PART = "compare"


@dataclass(frozen=True)
class CompareOutputs:
    directory: Path
    main: pd.DataFrame
    differences: pd.DataFrame


def run_compare(cfg: ExperimentConfig) -> CompareOutputs:
    arms = plan_arms(cfg)  # refuses bad settings before anything is written or trained
    out = start_run_dir(cfg, PART)
    records = []
    for i, arm in enumerate(arms, 1):
        log.info("arm %d/%d: %s, seed %d, %s", i, len(arms), arm.scenario, arm.seed, arm.label)
        records.append(run_compare_arm(arm))
    _central_curves(arms, records)
    mix = {key: _label_mix(cfg, key) for key in cfg.compare.scenarios}
    _, main, diffs = write_report(cfg, arms, records, mix, out)
    atomic_write_text(
        out / "arms.json",
        json.dumps(
            [
                {"label": a.label, "scenario": a.scenario, "seed": a.seed, "folder": str(a.folder)}
                for a in arms
            ],
            indent=2,
        ),
    )
    return CompareOutputs(out, main, diffs)


def _central_curves(arms: list[CompareArm], records: list[dict]) -> None:
    """Give every federated arm's run the centralised arm's validation curve of its scenario and seed."""
    central = {
        (a.scenario, a.seed): r["curve"] for a, r in zip(arms, records, strict=True) if a.kind == CENTRALISED
    }
    for arm in arms:
        if arm.kind == FEDERATED:
            curve = central[(arm.scenario, arm.seed)]
            atomic_write_text(arm.folder / "federation" / CENTRALISED_CURVE, json.dumps(curve))


def _label_mix(cfg: ExperimentConfig, scenario: str) -> pd.DataFrame:
    """Training images per DR grade at each site of the scenario (its first seed's partition)."""
    task = cfg.finetune.task
    column = label_column(task)
    seeded = cfg.model_copy(update={"seed": cfg.compare.seeds[0]})
    counts = {}
    for site in scenario_sites(load_scenario(scenario), seeded.seed):
        if column in site.rows:
            train, _ = finetune_split(site.rows, task, seeded)
            counts[site.name] = train[column].astype(int).value_counts().sort_index()
    return pd.DataFrame(counts).T.fillna(0).astype(int)
