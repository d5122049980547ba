"""The studies' parts: DR, myopic and AD/PD-like evidence visible at the cpu size, nested label-count subsets,
BatchNorm re-estimation, the linear probe's read-out, and the federated arms' equal compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from shared.config import load_config
from shared.data.site import load_site
from shared.data.splits import label_count_subset
from shared.data.synth.evidence import neuro_vessel_table, sign_evidence
from shared.errors import ConfigError
from shared.models import TaskModel, nnmobilenet
from shared.training.finetune import reestimate_batchnorm
from shared.training.linear_probe import fit_probe
from simulation.studies.federated_spark import plan_federated


def test_every_referable_grade_shows_evidence_of_at_least_two_pixels_at_128() -> None:
    evidence = {g: sign_evidence("dr", g, 128, eyes=4) for g in range(5)}
    assert evidence[0].changed == 0.0
    assert evidence[1].changed > 0.001  # microaneurysms are visible (they were 0.06% before)
    for grade in (2, 3, 4):
        assert evidence[grade].diameter >= 2.0
        assert evidence[grade].changed > 5 * evidence[1].changed


def test_myopic_grades_each_add_visible_evidence_over_the_grade_below_at_128() -> None:
    """Grade 1 (tessellation, a paler fundus) changes most of the eye; each higher grade adds what tells it
    from the grade below: diffuse atrophy a broad tint, patchy and macular atrophy regions of >= 2 px."""
    assert sign_evidence("mm", 1, 128, eyes=4).changed > 0.5
    steps = {g: sign_evidence("mm", g, 128, eyes=4, versus=g - 1) for g in (2, 3, 4)}
    assert all(e.changed > 0.005 for e in steps.values())
    assert steps[3].diameter >= 2.0 and steps[4].diameter >= 2.0


def test_the_neuro_sign_widens_venules_narrows_arterioles_and_bends_and_prunes_the_tree() -> None:
    """The AD/PD-like sign, the same patients with and without it: each vessel statistic moves the way the
    renderer says, by at least half the controls' spread between patients, and visibly moves some pixels."""
    table = neuro_vessel_table(size=128, eyes=16)
    assert table["vein_px"][2] > 0.5 and table["artery_px"][2] < -0.5 and table["av_ratio"][2] < -0.5
    assert table["tortuosity"][2] > 0.5 and table["branches"][2] < -0.5
    assert 0.01 < sign_evidence("neuro", 1, 128, eyes=4).changed < 0.5


def _rows(patients: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    grades = rng.integers(0, 5, patients)
    return pd.DataFrame(
        {
            "image_id": [f"{p}_{e}" for p in range(patients) for e in ("l", "r")],
            "patient_id": [str(p) for p in range(patients) for _ in range(2)],
            "label_dr": np.repeat(grades, 2),
        }
    )


def test_label_count_subsets_are_whole_patients_nested_and_stratified() -> None:
    rows = _rows(100)
    small, large = (label_count_subset(rows, "label_dr", n, seed=3) for n in (20, 80))
    assert len(small) == 20 and len(large) == 80
    assert set(small["image_id"]) <= set(large["image_id"])
    assert (small.groupby("patient_id").size() == 2).all()
    assert small["label_dr"].nunique() == 5  # every grade in 10 patients
    assert label_count_subset(rows, "label_dr", 20, seed=3).equals(small)  # the same for every init
    assert len(label_count_subset(rows, "label_dr", 0, seed=3)) == len(rows)


class _Images(Dataset):
    def __init__(self, n: int) -> None:
        self.x = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 3 + 1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i], "label": torch.tensor(0)}


def test_batchnorm_reestimation_replaces_the_start_statistics_by_the_data_average() -> None:
    model = TaskModel(nnmobilenet(0.25), {"dr": 5})
    stem = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    stem.running_mean.fill_(100.0)
    data = _Images(16)
    reestimate_batchnorm(model, data, torch.device("cpu"), batch_size=8)
    with torch.no_grad():
        first = model.encoder.features[0](data.x)  # the stem conv's output feeds the first BatchNorm
    assert torch.allclose(stem.running_mean, first.mean(dim=(0, 2, 3)), atol=1e-4)
    assert stem.momentum == 0.1 and not model.training


def test_linear_probe_reads_separable_features_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    signal = np.eye(5)[y] * 3 + rng.normal(0, 1, (400, 5))
    noise = rng.normal(0, 1, (400, 5))
    good = fit_probe(signal[:300], y[:300], signal[300:], y[300:], "dr", 5)
    bad = fit_probe(noise[:300], y[:300], noise[300:], y[300:], "dr", 5)
    assert good["auc"] > 0.95 and abs(bad["auc"] - 0.5) < 0.1
    missing = fit_probe(signal[:300][y[:300] < 4], y[:300][y[:300] < 4], signal[300:], y[300:], "dr", 5)
    assert np.isfinite(missing["auc"])  # class 4 never trained: probability 0, shapes still match


def test_a_federated_spark_arm_of_more_rounds_takes_the_local_steps_that_keep_the_centralised_compute(
    tiny_sites: dict[str, Path], tmp_path: Path
) -> None:
    """`study.federated`: rounds = epochs keep a local epoch a round (the same passes as centralised); more
    rounds get pretrain.epochs x images / (rounds x sites x batch) local steps; a named local_steps stays."""
    pretrain_sites = [str(tiny_sites["ukb"]), str(tiny_sites["mmac"])]
    images = sum(len(load_site(p).rows) for p in pretrain_sites)
    arms = {
        "same": {},
        "short": {"federation.rounds_pretrain": 8},
        "given": {"federation.rounds_pretrain": 8, "federation.local_steps": 1},
    }
    cfg = load_config(
        profile="tiny",
        overrides={
            "runs_dir": str(tmp_path),
            "name": "study",
            "pretrain.epochs": 2,
            "study.pretrain_sites": pretrain_sites,
            "study.pretrain_seeds": [0, 1],
            "study.federated": arms,
        },
    )
    plan = {(f.arm, f.cfg.seed): f for f in plan_federated(cfg)}
    assert sorted(plan) == sorted((arm, k) for arm in arms for k in (0, 1))
    same, short, given = (plan[arm, 1] for arm in arms)
    assert (same.init, same.counterpart, same.cfg.name) == ("same-seed1", "spark-seed1", "same-seed1")
    assert same.cfg.federation.tasks == () and same.cfg.federation.rounds_finetune == 0
    assert same.cfg.federation.rounds_pretrain == 2 and same.cfg.federation.local_steps == 0
    assert same.sample_gradients == same.centralised_sample_gradients == 2 * images
    batch = cfg.pretrain.batch_size
    assert short.cfg.federation.local_steps == round(2 * images / (8 * 2 * batch))
    assert abs(short.sample_gradients - 2 * images) <= 8 * 2 * batch / 2  # within half a step per site-round
    assert given.cfg.federation.local_steps == 1 and given.sample_gradients == 8 * 2 * batch
    assert Path(same.cfg.runs_dir) == (tmp_path / "study").resolve()
    taken = cfg.model_copy(update={"study": cfg.study.model_copy(update={"federated": {"spark": {}}})})
    with pytest.raises(ConfigError, match=r"study\.federated\.spark: the name is taken"):
        plan_federated(taken)
