"""Images for training: manifest rows -> (normalised image, FOV mask, label), reproducibly augmented.

Each item's augmentation is drawn from a generator seeded by (epoch seed, image id), and each epoch's order
from a generator seeded by the epoch seed, so a run is reproducible whatever the number of loader workers,
and a federated round draws exactly what the matching centralised epoch draws.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from shared.data import transforms as T
from shared.data.cache import ImageCache
from shared.data.fundus import preprocess
from shared.data.labels import label_column
from shared.seeding import derive_seed, generator


class FundusDataset(Dataset):
    """One site's images at `size` px (the cache size), augmented by `recipe` and output at `out` px."""

    def __init__(
        self,
        manifest: pd.DataFrame,
        size: int,
        recipe: T.Recipe,
        *,
        task: str | None = None,
        cache: ImageCache | None = None,
        out: int | None = None,
        mean: Sequence[float] = T.FUNDUS_MEAN,
        std: Sequence[float] = T.FUNDUS_STD,
    ) -> None:
        self.rows = manifest.reset_index(drop=True)
        self.size, self.out, self.recipe = size, out or size, recipe
        self.cache = cache
        self.mean, self.std = tuple(mean), tuple(std)
        column = label_column(task) if task else None
        labels = self.rows[column] if column and column in self.rows else pd.Series([pd.NA] * len(self.rows))
        self.labels = torch.tensor(labels.fillna(-1).astype("int64").to_numpy())
        self.epoch_seed = 0

    def set_epoch_seed(self, seed: int) -> None:
        """Seed this epoch's augmentations (before iterating: loader workers copy it when they start)."""
        self.epoch_seed = seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.item(i, self.epoch_seed)

    def item(self, i: int, seed: int) -> dict[str, torch.Tensor]:
        """Image `i` augmented with the draws of `seed` (two seeds give MoCo its two views)."""
        row = self.rows.iloc[i]
        if self.cache is not None:
            rgb, fov = self.cache.get(row.image_id)
        else:
            pre = preprocess(Path(row.path), self.size)
            rgb, fov = pre.rgb, pre.fov
        image = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float().div_(255.0)
        mask = torch.from_numpy(np.array(fov)).unsqueeze(0)
        params = T.draw(self.recipe, self.size, self.out, generator(derive_seed(seed, row.image_id)))
        image, mask = T.apply(image, mask, params, self.out)
        image = T.erase(T.normalise(image, self.mean, self.std), params)
        return {"image": image, "fov": mask, "label": self.labels[i], "index": torch.tensor(i)}


class TwoViews(Dataset):
    """Two independently augmented views of each image, for contrastive pretraining."""

    def __init__(self, base: FundusDataset) -> None:
        self.base = base
        self.epoch_seed = 0

    def set_epoch_seed(self, seed: int) -> None:
        self.epoch_seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        query = self.base.item(i, derive_seed(self.epoch_seed, "query"))
        key = self.base.item(i, derive_seed(self.epoch_seed, "key"))
        return {"image": query["image"], "key_image": key["image"], "index": query["index"]}


class EpochSampler(Sampler[int]):
    """A permutation of `n` drawn from `seed` (or the identity when seed is None); no hidden global state.

    `start`/`stop` cut a window out of that permutation, so a run can train part of an epoch (local steps)
    and a later round continue exactly where it stopped.
    """

    def __init__(self, n: int, seed: int | None, start: int = 0, stop: int | None = None) -> None:
        self.n, self.seed = n, seed
        self.start, self.stop = start, n if stop is None else min(stop, n)

    def __iter__(self) -> Iterator[int]:
        order = (
            range(self.n)
            if self.seed is None
            else torch.randperm(self.n, generator=generator(self.seed)).tolist()
        )
        return iter(list(order)[self.start : self.stop])

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)


def loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int | None,
    train: bool,
    workers: int = 0,
    batches: tuple[int, int | None] = (0, None),
    shard: tuple[int, int] = (0, 1),
) -> DataLoader:
    """Batches in the order of `EpochSampler(seed)`; training drops the last short batch (BN needs B >= 2).

    `batches` = (first, count) trains only that window of the epoch's batches (count None: to the end).
    `shard` = (rank, world) loads only `batch[rank::world]` of each batch: one device's slice of it (see
    shared/training/replicas.py); every device walks the same batches.
    """
    first, count = batches
    stop = None if count is None else (first + count) * batch_size
    sampler = EpochSampler(len(dataset), seed, first * batch_size, stop)
    drop_last = train and len(dataset) >= batch_size
    return DataLoader(
        dataset,
        batch_sampler=Sliced(BatchSampler(sampler, batch_size, drop_last), *shard),
        num_workers=workers,
        persistent_workers=False,
    )


class Sliced(Sampler[list[int]]):
    """A batch sampler's batches, each cut to one device's slice `batch[rank::world]` (all of it at 1)."""

    def __init__(self, batches: BatchSampler, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield batch[self.rank :: self.world]

    def __len__(self) -> int:
        return len(self.batches)
