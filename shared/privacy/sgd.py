"""DP-SGD for the shared step loop: Opacus's per-sample gradients, clipping and noise, with the patient (or
the image) as the privacy unit.

`PrivateSGD` is what a training run opts into (`run_phase(..., privacy=...)`). It is one of the loop's two
kinds of steps (the other is `shared/training/loop.py:PlainSteps`): it wraps the optimiser once
(`attached`), draws the batches (`batches`) and prepares each step (`before_step`); the loop itself knows
nothing of DP:
- batches are Poisson samples of UNITS: each patient (or image) joins a batch with probability
  q = batch_size / images, so a batch holds batch_size images on average; empty and one-image batches are
  real steps (noise only, or one image), since skipping them would depend on the data;
- Opacus's GradSampleModule records each image's gradient; `UnitOptimizer` (`units.py`) sums them per
  unit, clips each unit's sum to `clip`, adds N(0, (sigma clip)^2) and divides by batch_size (a constant:
  the true batch size is private), then the wrapped optimiser (LAMB, AdamW, SGD) steps on that;
- sampling and noise draw from the OS's entropy, never from the run seed, which the server knows: a seeded
  noise could be subtracted and a seeded sample would void the subsampling amplification. A private run is
  therefore not bitwise reproducible; everything else (augmentation, masks, order inside a batch) still is.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from shared.privacy.accounting import Mechanism
from shared.seeding import generator

if TYPE_CHECKING:
    from shared.privacy.units import UnitOptimizer

UNITS = ("patient", "image")


def secret_generator() -> torch.Generator:
    """A generator seeded from the OS's entropy (the seed is never stored)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def unit_ids(dataset: Dataset, unit: str) -> np.ndarray:
    """Each image's privacy unit as an int: its patient (site and patient id) or itself."""
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    rows = pd.concat([p.rows for p in parts], ignore_index=True)  # type: ignore[attr-defined]
    if unit == "image":
        return np.arange(len(rows))
    return pd.factorize(rows["site"].astype(str) + "/" + rows["patient_id"].astype(str))[0]


def sample_rate(images: int, batch_size: int) -> float:
    """q such that a Poisson batch holds `batch_size` images on average, whatever the unit."""
    return min(1.0, batch_size / max(images, 1))


@dataclass
class PrivateSGD:
    """One private training run's settings and what it spent (`released`, one mechanism per piece)."""

    sigma: float
    clip: float
    unit: str
    batch_size: int
    mode: str = "functorch"  # Opacus's per-sample gradient engine: "functorch" or "hooks"
    released: list[Mechanism] = field(default_factory=list)
    rng: torch.Generator = field(default_factory=secret_generator)
    optimizer: UnitOptimizer | None = None
    every_batch: bool = field(default=True, init=False)  # an empty batch is a step too (noise only)

    @contextmanager
    def attached(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[UnitOptimizer]:
        """`optimizer` made private for `model`, whose per-sample gradient hooks are removed afterwards."""
        from opacus import GradSampleModule  # here: a site without DP never pays opacus's import

        from shared.privacy.units import UnitOptimizer

        gsm = GradSampleModule(
            model, batch_first=True, loss_reduction="mean", force_functorch=self.mode == "functorch"
        )
        self.optimizer = UnitOptimizer(
            optimizer,
            noise_multiplier=self.sigma,
            max_grad_norm=self.clip,
            expected_batch_size=self.batch_size,
            loss_reduction="mean",
            generator=self.rng,
        )
        try:
            with warnings.catch_warnings():  # torch's notice on every hooked backward of a first layer
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                yield self.optimizer
        finally:
            gsm._close()
            self.optimizer = None

    def batches(
        self,
        dataset: Dataset,
        first: int,
        count: int,
        order_seed: int,
        workers: int = 0,
        shard: object = None,
    ) -> DataLoader:
        """`count` Poisson batches of `dataset`'s units, each in the epoch's (public) order (`first` and
        `shard` do not apply: a Poisson batch has no place in an epoch, and DP trains on one device)."""
        units = unit_ids(dataset, self.unit)
        sampler = PoissonBatches(units, sample_rate(len(units), self.batch_size), count, order_seed, self.rng)
        return DataLoader(
            WithUnits(dataset, units), batch_sampler=sampler, collate_fn=_collate, num_workers=workers
        )

    def spend(self, images: int, steps: int) -> None:
        """Record `steps` steps taken over a dataset of `images` images."""
        if steps:
            self.released.append((self.sigma, sample_rate(images, self.batch_size), steps))

    def before_step(self, batch: dict[str, torch.Tensor]) -> None:
        """Tell the optimiser which unit each image of the coming step belongs to (none: an empty batch)."""
        assert self.optimizer is not None, "PrivateSGD.before_step outside attached()"
        self.optimizer.units = batch["unit"] if batch else torch.zeros(0, dtype=torch.long)


class PoissonBatches(Sampler[list[int]]):
    """`count` batches, each taking every unit with probability `q` (all of that unit's images)."""

    def __init__(self, units: np.ndarray, q: float, count: int, order_seed: int, rng: torch.Generator):
        self.units, self.q, self.count, self.rng = torch.from_numpy(units), q, count, rng
        order = torch.randperm(len(units), generator=generator(order_seed))
        self.rank = torch.empty_like(order)
        self.rank[order] = torch.arange(len(units))

    def __iter__(self) -> Iterator[list[int]]:
        n_units = int(self.units.max()) + 1 if len(self.units) else 0
        for _ in range(self.count):
            taken = torch.rand(n_units, generator=self.rng) < self.q
            images = torch.nonzero(taken[self.units]).flatten()
            yield images[torch.argsort(self.rank[images])].tolist()

    def __len__(self) -> int:
        return self.count


class WithUnits(Dataset):
    """A dataset whose items also carry their privacy unit."""

    def __init__(self, base: Dataset, units: np.ndarray) -> None:
        self.base, self.units = base, units

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.base[i] | {"unit": torch.tensor(int(self.units[i]))}


def _collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """An empty Poisson batch collates to {} (a noise-only step)."""
    return default_collate(items) if items else {}
