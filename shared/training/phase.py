"""One run of a training phase: the outer loop every caller shares.

A federated site's round, `fedretina pretrain`, `fedretina finetune` (every fold, or the hold-out run) all
call `run_phase` with a `Method` (the model and what its training needs), datasets keyed by task, and a
`Span` (which part of the phase to train). `run_phase` owns the work plan, the schedule, the per-epoch random
streams and the FedProx term; optimiser state comes in and goes out, so a site can keep its moments between
rounds and a command between epochs. Because every caller goes through this one function, a site holding all
the data trains exactly what the centralised command trains (the integration tests check it bitwise).

Epoch seeds are derived from (run seed, method, global epoch, data key), the data key being the site's name
(or the pooled sites' names joined by "+"), with ":<task>" added for a task's data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from shared.privacy.sgd import PrivateSGD, sample_rate
from shared.training.loop import (
    EpochResult,
    EpochSeeds,
    PlainSteps,
    Steps,
    proximal_penalty,
    step_plan,
    train_epoch,
)
from shared.training.optim import Schedule
from shared.training.replicas import Replica

# (batch, the batch's own generator, task) -> (loss, images in the batch), or None to skip the batch
LossFn = Callable[[dict[str, torch.Tensor], torch.Generator, str], tuple[torch.Tensor, int] | None]


@dataclass(frozen=True)
class Method:
    """What a training method brings to a phase (see `spark_method`, `classifier_method`, `moco_method`)."""

    streams: str  # names its random streams: "pretrain", "finetune", "moco"
    model: nn.Module
    batch_size: int
    loss: LossFn
    optimizer: Callable[[], torch.optim.Optimizer]
    schedule: Callable[[int, int], Schedule]  # (steps per epoch, total steps of the phase) -> schedule
    clip: tuple[Sequence[nn.Parameter], float] | None = None  # None: no clipping here (LAMB clips itself)


@dataclass(frozen=True)
class Piece:
    """A stretch of one task's epoch: batches [first, first + count) of epoch `epoch`."""

    task: str
    epoch: int
    first: int
    count: int


@dataclass(frozen=True)
class Span:
    """Which part of a phase to train: units [start, stop) of a phase `total` units long.

    A unit is an epoch over every task's data, task after task; or, with `steps`, one batch of each task,
    continuing each task's epochs where the previous span stopped (the position follows from `start`, so
    nothing but the optimiser needs remembering).
    """

    start: int
    stop: int
    total: int
    steps: bool = False

    @classmethod
    def epochs(cls, total: int, start: int = 0) -> Span:
        return cls(start, total, total)

    @staticmethod
    def equal_compute_steps(epochs: int, images: list[int], rounds: int, batch: int) -> int:
        """Local steps a round that make `rounds` rounds of every site's batches (sites holding `images`)
        the sample-gradients of `epochs` centralised epochs over the pooled images, to the nearest step."""
        return max(1, round(epochs * sum(images) / (rounds * len(images) * batch)))

    @classmethod
    def round(cls, rnd: int, rounds: int, local_epochs: int, local_steps: int) -> Span:
        """Round `rnd` (1-based) of `rounds`, each `local_steps` batches per task if set, else epochs."""
        per = local_steps or local_epochs
        return cls((rnd - 1) * per, rnd * per, rounds * per, steps=local_steps > 0)

    def pieces(self, per_epoch: Mapping[str, int]) -> list[Piece]:
        """This span's work in training order, given each task's batches per epoch."""
        if self.steps:
            return [
                Piece(t, e, first, n)
                for t in per_epoch
                for e, first, n in step_plan(self.start, self.stop - self.start, per_epoch[t])
            ]
        return [Piece(t, e, 0, per_epoch[t]) for e in range(self.start, self.stop) for t in per_epoch]

    def private_plan(self, images: Mapping[str, int], batch_size: int) -> list[tuple[float, int]]:
        """What a private run of this span will spend, before it runs: [(sample rate, steps)] per task over
        datasets of `images[task]` images, from the same pieces `run_phase` trains."""
        per_epoch = {t: steps_per_epoch(n, batch_size) for t, n in images.items()}
        steps: dict[str, int] = {}
        for piece in self.pieces(per_epoch):
            steps[piece.task] = steps.get(piece.task, 0) + piece.count
        return [(sample_rate(images[t], batch_size), n) for t, n in steps.items() if n]

    def global_steps(self, per_epoch: Mapping[str, int]) -> tuple[int, int]:
        """(the phase's global step at this span's start, the phase's total steps): the schedule's clock."""
        per_unit = len(per_epoch) if self.steps else sum(per_epoch.values())
        return self.start * per_unit, self.total * per_unit


@dataclass(frozen=True)
class EpochEnd:
    """What `after_epoch` hears when every task's part of an epoch is done."""

    epoch: int  # 0-based, global within the phase
    step: int  # global step after it
    loss: float  # image-weighted mean over the epoch's tasks
    seconds: float  # training time of the epoch
    optimizer: torch.optim.Optimizer


@dataclass
class PhaseResult:
    optimizer: torch.optim.Optimizer  # its state goes out: a site keeps it for its next round
    step: int  # the phase's global step reached
    pieces: list[tuple[Piece, EpochResult]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(r.steps for _, r in self.pieces)

    @property
    def loss(self) -> float:
        """The image-weighted mean loss of every piece trained (NaN when nothing was)."""
        return _mean_loss([r for _, r in self.pieces])

    def epoch_end(self, epoch: int, seconds: float) -> EpochEnd:
        loss = _mean_loss([r for p, r in self.pieces if p.epoch == epoch])
        return EpochEnd(epoch, self.step, loss, seconds, self.optimizer)


def _mean_loss(results: list[EpochResult]) -> float:
    images = sum(r.images for r in results)
    return sum(r.loss * r.images for r in results) / images if images else float("nan")


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Full batches per epoch (the last short batch is dropped; at least one batch of >= 2 images)."""
    return max(n_images // batch_size, 1 if n_images >= 2 else 0)


def run_phase(
    method: Method,
    data: Mapping[str, Dataset],
    span: Span,
    *,
    seed: int,
    key: str,
    workers: int = 0,
    optimizer_state: dict | None = None,
    proximal_mu: float = 0.0,
    after_epoch: Callable[[EpochEnd], bool] | None = None,
    desc: str = "",
    privacy: PrivateSGD | None = None,
    replica: Replica | None = None,
    on_optimizer: Callable[[torch.optim.Optimizer], None] | None = None,
) -> PhaseResult:
    """Train `method.model` in place over `data` (task -> images; "" for pretraining's one dataset) for
    `span`, starting from `optimizer_state` when given. `after_epoch` (epoch spans only) is called after each
    epoch and stops the run by returning True. `proximal_mu` > 0 adds FedProx's term towards the weights
    the run started from. `privacy` trains with DP-SGD and records what it spent. A `replica` is one of a
    site's devices: it trains its slice of every batch in step with the others (shared/training/replicas.py).
    `on_optimizer` is handed the optimiser before the first step (to hook it: MimeLite's fixed moments).
    The model must already be on its device."""
    optimizer = method.optimizer()
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    if on_optimizer is not None:
        on_optimizer(optimizer)
    per_epoch = {t: steps_per_epoch(len(d), method.batch_size) for t, d in data.items()}
    pieces = span.pieces(per_epoch)
    step, total = span.global_steps(per_epoch)
    steps: Steps = privacy if privacy is not None else PlainSteps(method.batch_size, method.clip)
    result = PhaseResult(optimizer, step)
    started = time.perf_counter()
    with steps.attached(method.model, optimizer) as stepper:
        run = PieceRun(
            method,
            steps,
            stepper,
            method.schedule(sum(per_epoch.values()), total),
            proximal_penalty(method.model, proximal_mu),
            workers,
            desc,
            replica,
        )
        for index, piece in enumerate(pieces):
            task_key = f"{key}:{piece.task}" if piece.task else key
            done = run.train(
                data[piece.task],
                piece,
                EpochSeeds.of(seed, method.streams, piece.epoch, task_key),
                result.step,
            )
            steps.spend(len(data[piece.task]), done.steps)
            result.step += done.steps
            result.pieces.append((piece, done))
            epoch_done = index + 1 == len(pieces) or pieces[index + 1].epoch != piece.epoch
            if after_epoch is not None and not span.steps and epoch_done:
                if after_epoch(result.epoch_end(piece.epoch, time.perf_counter() - started)):
                    break
                started = time.perf_counter()
    if replica is not None:
        replica.average_buffers(method.model)
    return result


@dataclass(frozen=True)
class PieceRun:
    """What every piece of one phase run trains with: the method, its kind of steps (plain or DP-SGD) and
    the optimiser they step, the schedule, FedProx's penalty, data-loading workers, the progress label's
    prefix, and this process's device among a site's several."""

    method: Method
    steps: Steps
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    penalty: Callable[[], torch.Tensor] | None
    workers: int
    desc: str
    replica: Replica | None

    def train(self, dataset: Dataset, piece: Piece, seeds: EpochSeeds, step: int) -> EpochResult:
        """One piece of one task's epoch through the shared step loop, from global step `step`."""
        method, replica = self.method, self.replica
        seeds.start(dataset)
        method.model.train()
        shard = (replica.rank, replica.world) if replica else (0, 1)
        batches = self.steps.batches(dataset, piece.first, piece.count, seeds.order, self.workers, shard)

        def loss_of(batch: dict[str, torch.Tensor], g: torch.Generator) -> tuple[torch.Tensor, int] | None:
            return method.loss(batch, g, piece.task)

        label = " ".join(
            x for x in (self.desc or method.streams, piece.task, f"epoch {piece.epoch + 1}") if x
        )
        return train_epoch(
            batches,
            loss_of,
            self.optimizer,
            self.schedule.apply,
            seeds=seeds,
            first_batch=piece.first,
            step=step,
            steps=self.steps,
            desc=label,
            total=len(batches),
            penalty=self.penalty,
            replica=replica,
        )
