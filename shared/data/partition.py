"""Split one site's images into several virtual sites, always by patient (a person's images stay together).

- `iid`: patients dealt at random, equal shares.
- `dirichlet`: label skew; each class's patients are shared among parts by proportions ~ Dir(alpha)
  (small alpha: strongly skewed), the usual non-IID benchmark split.
- `camera`: covariate skew; patients clustered by the colour statistics of their images (k-means), the way
  cameras and sites differ in practice.

Every function returns one boolean row mask per part and is deterministic given the seed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from shared.data.splits import patient_labels
from shared.seeding import derive_seed


def _masks(df: pd.DataFrame, owner: pd.Series, parts: int) -> list[np.ndarray]:
    """Row masks from a patient -> part mapping."""
    part_of_row = df["patient_id"].map(owner).to_numpy()
    return [part_of_row == k for k in range(parts)]


def iid(df: pd.DataFrame, parts: int, seed: int) -> list[np.ndarray]:
    patients = np.array(sorted(df["patient_id"].unique()))
    rng = np.random.default_rng(derive_seed(seed, "iid") % 2**32)
    order = rng.permutation(len(patients))
    return _masks(df, pd.Series(np.arange(len(patients)) % parts, index=patients[order]), parts)


def dirichlet(df: pd.DataFrame, column: str, parts: int, alpha: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(derive_seed(seed, "dirichlet") % 2**32)
    labels = patient_labels(df, column).sort_index()
    owner: dict[str, int] = {}
    unlabelled = sorted(set(df["patient_id"]) - set(labels.dropna().index))
    for cls in sorted(labels.dropna().unique()):
        members = np.array(sorted(labels.index[labels == cls]))
        rng.shuffle(members)
        shares = rng.dirichlet(np.full(parts, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
        for k, chunk in enumerate(np.split(members, cuts)):
            owner.update(dict.fromkeys(chunk, k))
    for i, patient in enumerate(rng.permutation(unlabelled)):
        owner[patient] = i % parts
    return _masks(df, pd.Series(owner), parts)


def camera(df: pd.DataFrame, colour: np.ndarray, parts: int, seed: int) -> list[np.ndarray]:
    """`colour`: one feature row per image (e.g. mean and std of R, G, B inside the FOV)."""
    features = pd.DataFrame(colour, index=df.index).groupby(df["patient_id"]).mean().sort_index()
    scaled = (features - features.mean()) / features.std().replace(0, 1)
    from sklearn.cluster import KMeans  # here: every node imports this module, few split by camera

    km = KMeans(n_clusters=parts, n_init=10, random_state=derive_seed(seed, "camera") % 2**32)
    clusters = km.fit_predict(scaled.to_numpy())
    return _masks(df, pd.Series(clusters, index=features.index), parts)
