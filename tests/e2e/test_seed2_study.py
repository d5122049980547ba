"""`fedretina study seed2` end to end at the tiny profile: the five setups' pretrainings (natural-photo
stand-in, MoCo from random and from the stand-in, SparK), every paired arm scored on the test split and on an
external Messidor-2-like site, both readings of referable DR, and a resume that trains nothing again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.config import load_config
from shared.data.labels import referable
from shared.metrics import auc_score
from simulation.studies.seed2 import run_seed2_study

SETUPS = ["IWNE-FS", "IWNE-CL", "IFI-FS", "IFI-CL", "SparK"]


def test_seed2_study_runs_every_setup_on_test_and_external_images(
    eyepacs40: Path, tmp_path: Path, tiny_sites: dict[str, Path]
) -> None:
    cfg = load_config(
        profile="tiny",
        overrides={
            "sites": [str(eyepacs40)],
            "runs_dir": str(tmp_path / "runs"),
            "name": "seed2",
            "pretrain.epochs": 1,
            "finetune.steps": 2,
            "finetune.bootstrap": 10,
            "finetune.label_fractions": [1.0],
            "finetune.referable_threshold": 3,
            "study.pretrain_sites": [str(tiny_sites["ukb"])],
            "study.external_sites": [str(tiny_sites["messidor2"])],
            "study.seeds": [0],
            "study.archs": {"nnmobilenet": {"finetune.label_fractions": [1.0, 0.5]}},  # the arch's own win
            "study.pretraining": {"natural": {"pretrain.natural_crops": 32}},
        },
    )
    out = run_seed2_study(cfg).directory
    runs = tmp_path / "runs" / "seed2" / "seed2" / "nnmobilenet"
    for setup in ("natural", "moco", "moco-ifi", "spark"):
        assert (runs / setup / "pretrain" / "encoder.safetensors").is_file()
    arms = pd.read_csv(out / "arms.csv", dtype={"labels": str})
    assert sorted(arms.groupby(["split", "labels"]).size().unique()) == [len(SETUPS)]
    assert set(arms["split"]) == {"cv", "test", "external"} and set(arms["init"]) == set(SETUPS)
    # paired: within a label amount every setup trained on the very same images
    assert (arms.groupby(["labels", "split"])["train_images"].nunique() == 1).all()
    # the paper's reading, recomputed from the saved logits: softmax over (sum of referable logits, the rest)
    row = arms[(arms["split"] == "external") & (arms["init"] == "SparK") & (arms["labels"] == "0.5")].iloc[0]
    with np.load(runs / "seed0" / "predictions" / "external" / "SparK_50pct_fold0.npz") as saved:
        y, logits = saved["y_true"], saved["logits"]
    sums = np.stack([logits[:, :3].sum(1), logits[:, 3:].sum(1)], axis=1)
    p = np.exp(sums - sums.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert row["referable_auc_logits"] == pytest.approx(auc_score(referable(y, 3), p))
    diffs = pd.read_csv(out / "differences.csv")
    # splits x fractions x (setups against IWNE-FS, then IFI-CL against IFI-FS: the paper's CL minus FS)
    assert len(diffs) == 2 * 2 * len(SETUPS)
    assert set(diffs[diffs["versus"] == "IFI-FS"]["init"]) == {"IFI-CL"}
    assert (diffs["referable_auc_logits_low"] <= diffs["referable_auc_logits_high"]).all()
    table = (out / "table.md").read_text()
    assert "natural photos (scikit-image; stand-in for ImageNet)" in table
    assert "paper: summed logits" in table and "### external split" in table
    assert (out / "auc_vs_fraction_nnmobilenet_test.png").is_file()
    run_seed2_study(cfg, resume=True)  # everything is there: nothing trains, the same arms come back
    assert pd.read_csv(out / "arms.csv", dtype={"labels": str}).equals(arms)
