"""Folds never split a patient (nor a UK Biobank participant's visits); label fractions are nested and
stratified."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from shared.data.site import load_site
from shared.data.splits import assign_folds, inner_split, label_subset
from tests.conftest import write_site


def two_eyes_per_patient(patients: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        base = int(rng.choice(5, p=[0.5, 0.15, 0.2, 0.1, 0.05]))
        for eye in ("left", "right"):
            grade = int(np.clip(base + rng.choice([-1, 0, 1], p=[0.15, 0.7, 0.15]), 0, 4))
            rows.append({"image_id": f"{p}_{eye}", "patient_id": str(p), "eye": eye, "label_dr": grade})
    return pd.DataFrame(rows)


def test_no_patient_appears_in_two_folds_and_folds_are_stratified() -> None:
    df = two_eyes_per_patient()
    folds = assign_folds(df, "label_dr", 5, seed=0)
    assert set(folds) == {0, 1, 2, 3, 4}
    per_patient = pd.Series(folds).groupby(df["patient_id"]).nunique()
    assert (per_patient == 1).all()
    share = pd.crosstab(folds, df.groupby("patient_id")["label_dr"].transform("max"), normalize="index")
    assert (share.std() < 0.1).all()  # each fold holds about the same mix of severities


def test_inner_validation_split_is_patient_disjoint() -> None:
    df = two_eyes_per_patient()
    train, val = inner_split(df, "label_dr", 0.2, seed=1)
    assert not set(train["patient_id"]) & set(val["patient_id"])
    assert len(train) + len(val) == len(df)
    assert 0.12 < len(val) / len(df) < 0.28


def test_label_fractions_are_nested_and_keep_every_stratum() -> None:
    df = two_eyes_per_patient(200)
    subsets = {f: set(label_subset(df, "label_dr", f, seed=3)["patient_id"]) for f in (0.1, 0.2, 0.5, 1.0)}
    assert subsets[0.1] <= subsets[0.2] <= subsets[0.5] <= subsets[1.0]
    assert len(subsets[1.0]) == 200
    assert abs(len(subsets[0.1]) - 20) <= 5
    tenth = label_subset(df, "label_dr", 0.1, seed=3)
    assert set(tenth.groupby("patient_id")["label_dr"].max()) == {0, 1, 2, 3, 4}
    assert subsets[0.1] == set(label_subset(df, "label_dr", 0.1, seed=3)["patient_id"])


def test_ad_and_pd_folds_keep_every_visit_of_a_participant_together_and_are_stratified(
    tmp_path: Path,
) -> None:
    """The first seed's AD and PD identification by 5-fold CV, on a UK Biobank-like site read through its
    real layout (both eyes, repeat visits, an outcomes extract): no participant in two folds, and each fold
    holds about the cohort's share of cases."""
    rows = load_site(write_site(tmp_path, "ukb", 80, seed=4)).rows
    assert rows.groupby("patient_id").size().max() >= 4  # a repeat visit: two eyes twice
    for task in ("ad", "pd"):
        column = f"label_{task}"
        folds = assign_folds(rows, column, 5, seed=0)
        assert (pd.Series(folds).groupby(rows["patient_id"].to_numpy()).nunique() == 1).all()
        cases = pd.Series(rows[column].to_numpy() == 1).groupby(folds).mean()
        assert len(cases) == 5 and cases.min() > 0
        assert (cases - rows[column].eq(1).mean()).abs().max() < 0.12
