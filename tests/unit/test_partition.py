"""Virtual-site splitters (`shared.data.partition`): every image lands in exactly one part, a patient never
straddles parts, the split is a pure function of the seed, and each splitter produces the skew it promises
(iid: equal patient shares; dirichlet: label skew that grows as alpha shrinks, unlabelled patients included;
camera: colour clusters become parts)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from shared.data.partition import camera, dirichlet, iid
from shared.data.splits import patient_labels

PATIENTS, PARTS, CLASSES = 40, 3, 3

Splitter = Callable[[pd.DataFrame, int], list[np.ndarray]]


def manifest(seed: int = 0) -> pd.DataFrame:
    """~80 rows: 40 patients with 1-3 images; every 8th patient is unlabelled, others have some NA images."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, object]] = []
    for p in range(PATIENTS):
        label = pd.NA if p % 8 == 0 else int(rng.integers(0, CLASSES))
        for i in range(int(rng.integers(1, 4))):
            rows.append((f"p{p:02d}", label if i == 0 or rng.random() < 0.5 else pd.NA))
    df = pd.DataFrame(rows, columns=["patient_id", "label_dr"])
    df["label_dr"] = df["label_dr"].astype("Int64")
    return df.iloc[rng.permutation(len(df))].reset_index(drop=True)  # a patient's rows need not be adjacent


def cluster_of(patient: str) -> int:
    return int(patient[1:]) % PARTS


def colours(df: pd.DataFrame, seed: int = 0) -> np.ndarray:
    """6 colour features per image: a patient's cluster centre (far apart) plus small per-image noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, size=(PARTS, 6)) * 10.0
    return centres[df["patient_id"].map(cluster_of).to_numpy()] + rng.normal(0.0, 0.1, size=(len(df), 6))


SPLITTERS: dict[str, Splitter] = {
    "iid": lambda df, seed: iid(df, PARTS, seed),
    "dirichlet": lambda df, seed: dirichlet(df, "label_dr", PARTS, 0.5, seed),
    "camera": lambda df, seed: camera(df, colours(df), PARTS, seed),
}


def patients_of(df: pd.DataFrame, mask: np.ndarray) -> set[str]:
    return set(df.loc[mask, "patient_id"])


@pytest.mark.parametrize("name", SPLITTERS)
def test_every_row_is_in_exactly_one_part(name: str) -> None:
    df = manifest()
    masks = SPLITTERS[name](df, 0)
    assert len(masks) == PARTS
    assert all(m.dtype == bool and m.shape == (len(df),) for m in masks)
    np.testing.assert_array_equal(np.sum(masks, axis=0), np.ones(len(df), dtype=int))


@pytest.mark.parametrize("name", SPLITTERS)
def test_no_patient_straddles_parts(name: str) -> None:
    df = manifest()
    groups = [patients_of(df, m) for m in SPLITTERS[name](df, 0)]
    assert sum(len(g) for g in groups) == PATIENTS  # disjoint sets that together hold every patient
    assert set().union(*groups) == set(df["patient_id"])


@pytest.mark.parametrize("name", SPLITTERS)
def test_same_seed_gives_identical_masks(name: str) -> None:
    df = manifest()
    for a, b in zip(SPLITTERS[name](df, 7), SPLITTERS[name](df, 7), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["iid", "dirichlet"])
def test_a_different_seed_gives_different_masks(name: str) -> None:
    df = manifest()
    first, second = SPLITTERS[name](df, 0), SPLITTERS[name](df, 1)
    assert any(not np.array_equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_iid_parts_have_near_equal_patient_counts(parts: int) -> None:
    df = manifest()
    counts = [len(patients_of(df, m)) for m in iid(df, parts, seed=3)]
    assert sum(counts) == PATIENTS
    assert max(counts) - min(counts) <= 1


def label_skew(df: pd.DataFrame, masks: list[np.ndarray]) -> float:
    """Mean total-variation distance of each part's patient-label histogram from the pooled one."""
    labels = patient_labels(df, "label_dr").dropna()
    pooled = labels.value_counts(normalize=True)
    distances = []
    for mask in masks:
        mine = labels[labels.index.isin(patients_of(df, mask))]
        if len(mine):
            hist = mine.value_counts(normalize=True).reindex(pooled.index, fill_value=0.0)
            distances.append(0.5 * float((hist - pooled).abs().sum()))
    return float(np.mean(distances))


def test_dirichlet_small_alpha_skews_labels_far_more_than_large_alpha() -> None:
    df = manifest()
    seeds = range(5)
    skewed = [label_skew(df, dirichlet(df, "label_dr", PARTS, 0.1, s)) for s in seeds]
    balanced = [label_skew(df, dirichlet(df, "label_dr", PARTS, 100.0, s)) for s in seeds]
    assert all(s > b for s, b in zip(skewed, balanced, strict=True)), (skewed, balanced)
    assert np.mean(skewed) > 0.3 > 0.1 > np.mean(balanced), (skewed, balanced)


@pytest.mark.parametrize("alpha", [0.1, 100.0])
def test_dirichlet_assigns_unlabelled_patients(alpha: float) -> None:
    df = manifest()
    labels = patient_labels(df, "label_dr")
    unlabelled = set(labels.index[labels.isna()])
    assert len(unlabelled) == PATIENTS // 8  # the fixture really has all-NA patients
    assigned = set().union(*(patients_of(df, m) for m in dirichlet(df, "label_dr", PARTS, alpha, 0)))
    assert unlabelled <= assigned


@pytest.mark.parametrize("seed", [0, 1])
def test_camera_puts_each_colour_cluster_in_its_own_part(seed: int) -> None:
    df = manifest()
    clusters = {c: {p for p in df["patient_id"] if cluster_of(p) == c} for c in range(PARTS)}
    groups = [patients_of(df, m) for m in camera(df, colours(df), PARTS, seed)]
    assert sorted(map(sorted, groups)) == sorted(map(sorted, clusters.values()))
