"""`fedretina study pretraining` end to end at the tiny profile: every arm of every seed, paired subsets,
the paired differences with their intervals, the probe curve, and a resume that trains nothing again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from shared.config import load_config
from simulation.studies.pretraining import run_pretraining_study


def test_study_pairs_arms_and_reports_differences_with_intervals(
    eyepacs40: Path, tmp_path: Path, tiny_sites: dict[str, Path]
) -> None:
    cfg = load_config(
        profile="tiny",
        overrides={
            "sites": [str(eyepacs40)],
            "runs_dir": str(tmp_path / "runs"),
            "name": "study",
            "pretrain.epochs": 2,
            "finetune.steps": 4,
            "finetune.bootstrap": 20,
            "study.pretrain_sites": [str(tiny_sites["ukb"])],
            "study.label_counts": [10, 0],
            "study.seeds": [0, 1],
            "study.probe_every": 1,
        },
    )
    out = run_pretraining_study(cfg).directory
    arms = pd.read_csv(out / "arms.csv", dtype={"labels": str})
    test = arms[arms["split"] == "test"]
    assert len(test) == 2 * 2 * 2  # seeds x counts x inits
    small = test[test["labels"] == "10img"]
    assert (small["train_images"] + small["val_images"] <= 10).all()
    # paired: within a seed and count, both inits trained on the very same images
    assert (small.groupby(["seed"])["train_images"].nunique() == 1).all()
    diff = pd.read_csv(out / "differences.csv", dtype={"labels": str})
    assert list(diff["labels"]) == ["10img", "1.0"] and set(diff["init"]) == {"spark"}
    assert (diff["referable_auc_low"] <= diff["referable_auc_high"]).all()
    probe = pd.read_csv(out / "probe.csv")
    assert list(probe["epoch"]) == [0, 1, 2]  # the random encoder, then every snapshot
    assert np.isfinite(probe["auc"]).all()
    table = (out / "table.md").read_text()
    assert table.count("| spark |") == 2 and table.count("| spark − scratch |") == 2  # means, differences
    stamp = (out / "arms.csv").stat().st_mtime_ns
    run_pretraining_study(cfg, resume=True)  # nothing left to train: arms.csv is rewritten unchanged
    assert pd.read_csv(out / "arms.csv", dtype={"labels": str}).equals(arms)
    assert stamp <= (out / "arms.csv").stat().st_mtime_ns
