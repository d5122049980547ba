"""What every training epoch shares, centralised or federated: its random streams, its kind of steps and
its step loop.

An epoch's randomness (data order, augmentation, SparK masks, dropout) is derived from (run seed, method,
global epoch, data key); see `shared.training.phase`, the one caller of `train_epoch`. How batches are drawn
and a step is prepared is the `Steps` object's: `PlainSteps` here, or DP-SGD (`shared/privacy/sgd.py:
PrivateSGD`), which wraps the optimiser once, as Opacus does; the loop asks it and never branches on DP.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch.utils.data import ConcatDataset, Dataset

from shared.data.dataset import loader
from shared.logs import progress_bar
from shared.seeding import derive_seed, generator, seed_everything
from shared.training.replicas import Replica

Batch = dict[str, torch.Tensor]


class Steps(Protocol):
    """A training run's kind of steps: how its batches are drawn, and what happens before each step."""

    every_batch: bool  # a batch without a loss is a step too (DP-SGD: an empty Poisson batch adds noise)

    def attached(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> AbstractContextManager[torch.optim.Optimizer]:
        """The optimiser the loop steps, for the whole run (wrapped, where the kind needs it)."""
        ...

    def batches(
        self, dataset: Dataset, first: int, count: int, order_seed: int, workers: int, shard: tuple[int, int]
    ) -> Iterable[Batch]:
        """Batches [first, first + count) of `dataset`'s epoch drawn in order `order_seed` (this process's
        `shard` of each, on a site with several devices)."""
        ...

    def before_step(self, batch: Batch) -> None:
        """After the backward pass, before the optimiser's step."""
        ...

    def spend(self, images: int, steps: int) -> None:
        """`steps` steps were taken over `images` images (what DP-SGD accounts)."""
        ...


@dataclass
class PlainSteps:
    """Minibatch SGD: shuffled batches of `batch_size` (the last short one dropped), the gradient clipped to
    `clip` (parameters, max norm) before each step when the method asks for it."""

    batch_size: int
    clip: tuple[Sequence[torch.nn.Parameter], float] | None = None
    every_batch: bool = False

    @contextmanager
    def attached(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> Iterator[torch.optim.Optimizer]:
        yield optimizer

    def batches(
        self, dataset: Dataset, first: int, count: int, order_seed: int, workers: int, shard: tuple[int, int]
    ) -> Iterable[Batch]:
        return loader(
            dataset,
            self.batch_size,
            seed=order_seed,
            train=True,
            workers=workers,
            batches=(first, count),
            shard=shard,
        )

    def before_step(self, batch: Batch) -> None:
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(list(self.clip[0]), self.clip[1])

    def spend(self, images: int, steps: int) -> None:
        pass  # nothing is accounted outside DP


@dataclass(frozen=True)
class EpochSeeds:
    order: int
    augment: int
    mask: int
    torch: int

    @classmethod
    def of(cls, run_seed: int, phase: str, epoch: int, key: str) -> EpochSeeds:
        return cls(
            *(
                derive_seed(run_seed, phase, epoch, key, stream)
                for stream in ("order", "augment", "mask", "torch")
            )
        )

    def start(self, dataset: Dataset) -> None:
        """Seed the dataset's augmentations for this epoch (per image: see FundusDataset)."""
        for part in dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]:
            part.set_epoch_seed(self.augment)

    def batch(self, index: int, rank: int = 0) -> torch.Generator:
        """Batch `index`'s draws (masks, mixup, key shuffles) and torch's global generator (dropout), seeded
        by the batch's place in its epoch: any window of an epoch draws what the whole epoch would. A
        site's other devices (`rank` > 0) draw their own for their slices of the batch."""
        extra = (rank,) if rank else ()
        seed_everything(derive_seed(self.torch, index, *extra))
        return generator(derive_seed(self.mask, index, *extra))


@dataclass
class Meter:
    """Running mean of a loss over an epoch, with throughput."""

    total: float = 0.0
    images: int = 0
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, n: int) -> None:
        self.total += loss * n
        self.images += n
        self.steps += 1

    @property
    def mean(self) -> float:
        return self.total / max(self.images, 1)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def rate(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class EpochResult:
    loss: float
    images: int
    steps: int
    seconds: float


def train_epoch(
    batches: Iterable[Batch],
    loss_of: Callable[[Batch, torch.Generator], tuple[torch.Tensor, int] | None],
    optimizer: torch.optim.Optimizer,
    schedule: Callable[[torch.optim.Optimizer, int], float],
    *,
    seeds: EpochSeeds,
    first_batch: int,
    step: int,
    steps: Steps,
    desc: str,
    total: int,
    penalty: Callable[[], torch.Tensor] | None = None,
    replica: Replica | None = None,
) -> EpochResult:
    """The step loop every method shares: schedule, loss, backward, the kind of steps' preparation (clipping),
    step, bookkeeping.

    `loss_of(batch, g)` returns (loss, images in the batch) or None to skip a batch (a single image, which
    BatchNorm cannot normalise), unless `steps.every_batch`; `g` holds the batch's own random draws.
    `first_batch` is the index in its epoch of the first batch given; `step` the global step there (it drives
    the schedule). `penalty()`, when given, is added to every step's loss (FedProx's proximal term). A
    `replica` trains its slice of each batch and averages the gradients with the site's other devices.
    """
    meter = Meter()
    bar = progress_bar(desc, total=total, unit="batch")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, batch in enumerate(batches, start=first_batch):
        schedule(optimizer, step)
        g = seeds.batch(index, replica.rank if replica else 0)
        out = loss_of(batch, g) if batch else None
        if out is None and not steps.every_batch and replica is None:
            continue
        optimizer.zero_grad(set_to_none=True)
        if out is not None:
            (out[0] + penalty() if penalty is not None else out[0]).backward()
        if replica is not None:
            loss, images = replica.sync(params, float(out[0].detach()) if out else 0.0, out[1] if out else 0)
            if not images:
                continue
            out = (torch.tensor(loss), images)
        steps.before_step(batch)
        optimizer.step()
        step += 1
        meter.add(float(out[0].detach()) if out else 0.0, out[1] if out else 0)
        bar.update(1)
        bar.set_postfix(loss=f"{meter.mean:.4f}", img_s=f"{meter.rate:.1f}")
    bar.close()
    return EpochResult(meter.mean, meter.images, meter.steps, meter.seconds)


def proximal_penalty(model: torch.nn.Module, mu: float) -> Callable[[], torch.Tensor] | None:
    """FedProx (Li et al. 2020): mu/2 * ||w - w_start||^2, w_start being the weights the round began with."""
    if mu <= 0:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params]

    def penalty() -> torch.Tensor:
        return 0.5 * mu * sum((p - a).pow(2).sum() for p, a in zip(params, anchors, strict=True))

    return penalty


def step_plan(start: int, count: int, per_epoch: int) -> list[tuple[int, int, int]]:
    """(epoch, first batch, batches) windows covering the global batches [start, start + count) of a run of
    epochs of `per_epoch` batches each: how a site trains `count` local steps from where it stopped."""
    plan, position, end = [], start, start + count
    while position < end and per_epoch > 0:
        epoch, first = divmod(position, per_epoch)
        n = min(per_epoch - first, end - position)
        plan.append((epoch, first, n))
        position += n
    return plan
