"""Patient-grouped, stratified cross-validation and nested label-fraction subsets.

- `assign_folds`: k folds by `StratifiedGroupKFold` over patients (no patient in two folds), stratified on a
  patient's most severe label so both eyes and every visit stay together.
- `inner_split`: from a fold's training part, a patient-grouped validation subset for model selection
  (the outer held-out fold is for reporting only; test splits are never used for selection).
- `label_subset`: nested, stratified subsets of patients (10% is inside 50% is inside 100%), so label-fraction
  curves compare like with like; `label_count_subset` the same by image count (50 inside 200 inside all).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from shared.errors import DataError
from shared.seeding import derive_seed


def patient_labels(df: pd.DataFrame, column: str) -> pd.Series:
    """One stratification label per patient: the most severe (largest) grade among their images."""
    return df.groupby("patient_id")[column].max()


def assign_folds(df: pd.DataFrame, column: str, k: int, seed: int) -> np.ndarray:
    """Fold index (0..k-1) per row; rows of one patient share a fold. Stratified by StratifiedGroupKFold
    (approximately balanced when patients are few) unless even the commonest class has fewer than k images,
    as at tiny label fractions; then patients are dealt at random (seeded), so every fold gets some."""
    strat = patient_labels(df, column).reindex(df["patient_id"]).to_numpy()
    if (count := df["patient_id"].nunique()) < k:
        raise DataError(f"{count} patients cannot fill {k} folds; lower finetune.folds")
    folds = np.full(len(df), -1, dtype=np.int64)
    if pd.Series(strat).value_counts().max() < k:
        patients = np.array(sorted(df["patient_id"].unique()))
        order = np.random.default_rng(derive_seed(seed, "folds") % 2**32).permutation(len(patients))
        owner = dict(zip(patients[order], np.arange(len(patients)) % k, strict=True))
        return df["patient_id"].map(owner).to_numpy(np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=derive_seed(seed, "folds") % 2**32)
    with warnings.catch_warnings():  # "least populated class has only n members": approximate is fine
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, test) in enumerate(
            splitter.split(np.zeros(len(df)), strat.astype(int), df["patient_id"])
        ):
            folds[test] = fold
    return folds


def inner_split(
    df: pd.DataFrame, column: str, val_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, validation) by patients, stratified; validation holds about `val_fraction` of them."""
    k = max(2, round(1 / val_fraction))
    if df["patient_id"].nunique() < k:
        raise DataError(
            f"too few patients ({df['patient_id'].nunique()}) for a {val_fraction:.0%} validation split"
        )
    folds = assign_folds(df, column, k, derive_seed(seed, "inner"))
    return df[folds != 0], df[folds == 0]


def label_subset(df: pd.DataFrame, column: str, fraction: float, seed: int) -> pd.DataFrame:
    """The first `fraction` of patients in a seeded, stratified order: nested across fractions."""
    if fraction >= 1.0:
        return df
    strat = patient_labels(df, column)
    rng = np.random.default_rng(derive_seed(seed, "fractions") % 2**32)
    order = pd.Series(rng.random(len(strat)), index=strat.index)
    position = order.groupby(strat).rank(method="first")  # 1.. within each stratum, in the seeded order
    size = strat.map(strat.value_counts())
    keep = position.index[position <= np.ceil(fraction * size)]  # ceil: every stratum keeps at least one
    return df[df["patient_id"].isin(keep)]


def label_count_subset(df: pd.DataFrame, column: str, images: int, seed: int) -> pd.DataFrame:
    """About `images` labelled images (whole patients, never more): patients taken in a seeded order that
    interleaves the strata in proportion, so the subset is stratified and nested across counts. 0 = all."""
    if images <= 0 or images >= len(df):
        return df
    strat = patient_labels(df, column)
    rng = np.random.default_rng(derive_seed(seed, "counts") % 2**32)
    order = pd.Series(rng.random(len(strat)), index=strat.index)
    position = order.groupby(strat).rank(method="first") / strat.map(strat.value_counts())
    ranked = position.sort_values(kind="stable").index
    sizes = df.groupby("patient_id").size().reindex(ranked).cumsum()
    keep = sizes.index[(sizes <= images).to_numpy() | (np.arange(len(sizes)) == 0)]
    return df[df["patient_id"].isin(keep)]
