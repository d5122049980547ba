"""What a site does in one federated round, without Flower: the same epoch functions as centralised
training, plus the state the site keeps between rounds in its own folder.

Site state (`<site state>/federation/<run name>/`, never sent): the optimiser state after each round (so a
site continues its LAMB/AdamW moments as a centralised run would, and a restarted node loses nothing), and
under FedBN the site's own BatchNorm parameters and statistics. Data order needs no state: each epoch's
order, augmentations and masks are derived from (run seed, phase, global epoch, site).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.aggregation import bn_keys
from shared.config import ExperimentConfig
from shared.data.site import Site
from shared.device import configure_torch
from shared.metrics import evaluate_predictions, metric_keys
from shared.rundir import atomic_write_text
from shared.training.checkpoint import load_checkpoint, save_checkpoint
from shared.training.data import site_images
from shared.training.finetune import (
    build_task_model,
    finetune_epoch,
    finetune_optimizer,
    finetune_schedule,
    finetune_split,
    predict,
    site_tasks,
)
from shared.training.loop import proximal_penalty, step_plan
from shared.training.pretrain import (
    build_spark,
    pretrain_epoch,
    pretrain_optimizer,
    pretrain_schedule,
    steps_per_epoch,
)
from shared.weights import load_into, load_weights, save_weights

log = logging.getLogger(__name__)
KEEP_ROUNDS = 3  # optimiser states kept per phase (a server resumed from an earlier checkpoint finds them)

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RoundSpec:
    """What the server asks for this round (from the message's ConfigRecord)."""

    phase: str  # "pretrain" or "finetune"
    round: int  # 1-based round within the phase
    total_rounds: int
    local_epochs: int
    local_steps: int
    proximal_mu: float
    strategy: str
    run_name: str
    run_uid: str = "run"  # the federated run's identity: state from another run is never picked up
    tasks: tuple[str, ...] = ()  # phase 2: the federation's tasks (one head each) ...
    classes: tuple[int, ...] = ()  # ... and their class counts

    @property
    def first_epoch(self) -> int:
        return (self.round - 1) * self.local_epochs


class SiteState:
    """Files a site keeps for one federated run."""

    def __init__(self, site: Site, spec: RoundSpec) -> None:
        self.dir = site.state / spec.run_name / spec.run_uid

    def _optimizer(self, phase: str, rnd: int) -> Path:
        return self.dir / f"{phase}-optimizer-r{rnd:04d}.safetensors"

    def resume(
        self, optimizer: torch.optim.Optimizer, cfg: ExperimentConfig, spec: RoundSpec
    ) -> torch.optim.Optimizer:
        """The optimiser with the state this site saved after the previous round, when configured to."""
        rnd, path = spec.round - 1, self._optimizer(spec.phase, spec.round - 1)
        if not cfg.federation.keep_optimizer_state or rnd < 1:
            return optimizer
        if path.exists():
            load_checkpoint(path, optimizer=optimizer)
        else:
            log.warning(
                "no optimiser state for %s round %d in %s: starting it afresh", spec.phase, rnd, self.dir
            )
        return optimizer

    def save_optimizer(self, optimizer: torch.optim.Optimizer, phase: str, rnd: int) -> None:
        save_checkpoint(self._optimizer(phase, rnd), {"phase": phase, "round": rnd}, optimizer=optimizer)
        self._optimizer(phase, rnd - KEEP_ROUNDS).unlink(missing_ok=True)

    def save_progress(self, spec: RoundSpec, step: int) -> None:
        """Where this site stands (round, global step): for people and audits; training derives it anyway."""
        record = {"round": spec.round, "total_rounds": spec.total_rounds, "step": step}
        atomic_write_text(self.dir / f"{spec.phase}-progress.json", json.dumps(record))

    def load_bn(self, model: nn.Module, phase: str, rnd: int) -> None:
        """FedBN: replace the server's BatchNorm entries by this site's own after round `rnd`, if any."""
        path = self.dir / f"{phase}-bn-r{rnd:04d}.safetensors"
        if path.exists():
            tensors, _ = load_weights(path)
            load_into(model, {**model.state_dict(), **tensors}, path)

    def save_bn(self, model: nn.Module, phase: str, rnd: int) -> None:
        keys = bn_keys(model)
        tensors = {k: v for k, v in model.state_dict().items() if k in keys}
        save_weights(self.dir / f"{phase}-bn-r{rnd:04d}.safetensors", tensors, {"phase": phase, "round": rnd})
        (self.dir / f"{phase}-bn-r{rnd - KEEP_ROUNDS:04d}.safetensors").unlink(missing_ok=True)


def pretrain_round(
    site: Site, cfg: ExperimentConfig, spec: RoundSpec, arrays: Tensors
) -> tuple[Tensors, dict]:
    """Local SparK epochs (or steps) from the global weights; returns (all weights, train metrics)."""
    started = time.perf_counter()
    model, device, state = global_model(site, cfg, spec, build_spark(cfg), arrays)
    dataset = site_images(site, cfg, cfg.data.image_size, "light")
    optimizer = state.resume(pretrain_optimizer(model, cfg), cfg, spec)
    per_epoch = {"": steps_per_epoch(len(dataset), cfg.pretrain.batch_size)}
    plan, step, total = work_plan(spec, per_epoch)
    schedule = pretrain_schedule(cfg, per_epoch[""], total)
    penalty, losses, first = proximal_penalty(model, spec.proximal_mu), [], step
    for _, epoch, batches in plan:
        result = pretrain_epoch(
            model,
            optimizer,
            schedule,
            dataset,
            cfg,
            epoch=epoch,
            key=site.name,
            step=step,
            device=device,
            desc=site.name,
            penalty=penalty,
            batches=batches,
        )
        step += result.steps
        losses.append(result.loss)
    _persist(state, model, optimizer, spec, step)
    return _cpu(model.state_dict()), _train_metrics(
        len(dataset), float(np.mean(losses)), step - first, started
    )


def finetune_round(
    site: Site, cfg: ExperimentConfig, spec: RoundSpec, arrays: Tensors
) -> tuple[Tensors, dict]:
    """Local fine-tuning of the encoder and this site's heads; returns (encoder + those heads, metrics)."""
    started = time.perf_counter()
    model, device, state = global_model(site, cfg, spec, _task_model(cfg, spec), arrays)
    tasks = site_tasks(site.rows, spec.tasks)
    f = cfg.finetune
    data = {
        t: site_images(
            site, cfg, cfg.finetune_image_size, f.augment, rows=finetune_split(site.rows, t, cfg)[0], task=t
        )
        for t in tasks
    }
    optimizer = state.resume(finetune_optimizer(model, cfg), cfg, spec)
    per_epoch = {t: steps_per_epoch(len(d), f.batch_size) for t, d in data.items()}
    plan, step, total = work_plan(spec, per_epoch)
    schedule = finetune_schedule(cfg, sum(per_epoch.values()), total)
    penalty, losses, first = proximal_penalty(model, spec.proximal_mu), [], step
    for task, epoch, batches in plan:
        result = finetune_epoch(
            model,
            optimizer,
            schedule,
            data[task],
            cfg,
            task=task,
            epoch=epoch,
            key=f"{site.name}:{task}",
            step=step,
            device=device,
            desc=f"{site.name} {task}",
            penalty=penalty,
            batches=batches,
        )
        step += result.steps
        losses.append(result.loss)
    _persist(state, model, optimizer, spec, step)
    images = sum(len(d) for d in data.values())
    metrics = _train_metrics(images, float(np.mean(losses)), step - first, started)
    metrics |= {f"examples-{t}": len(data[t]) if t in data else 0 for t in spec.tasks}  # weights of the heads
    sent = ("encoder.", *(f"heads.{t}." for t in tasks))
    return {k: v for k, v in _cpu(model.state_dict()).items() if k.startswith(sent)}, metrics


def global_model(
    site: Site,
    cfg: ExperimentConfig,
    spec: RoundSpec,
    model: nn.Module,
    arrays: Tensors,
    evaluating: bool = False,
) -> tuple[nn.Module, torch.device, SiteState]:
    """What every round starts with: the global weights loaded strictly (this site's own BatchNorm under
    FedBN: the previous round's to train, this round's to evaluate), on this run's device with its compute
    settings, and the site's state folder."""
    device = configure_torch(cfg)
    load_into(model, arrays, Path("global model"))
    state = SiteState(site, spec)
    if spec.strategy == "fedbn":
        state.load_bn(model, spec.phase, spec.round if evaluating else spec.round - 1)
    return model.to(device), device, state


def _task_model(cfg: ExperimentConfig, spec: RoundSpec) -> nn.Module:
    return build_task_model(cfg, dict(zip(spec.tasks, spec.classes, strict=True)))


def work_plan(
    spec: RoundSpec, per_epoch: dict[str, int]
) -> tuple[list[tuple[str, int, tuple[int, int]]], int, int]:
    """This round's (task, epoch, (first batch, batches)) in training order, the global step it starts at, and
    the phase's total steps (for the schedule).

    Epochs (the default): every task's whole epoch, epoch by epoch, the order centralised training uses.
    Steps (`local_steps` > 0): that many batches per task, continuing each task's epochs where the previous
    round stopped (the position follows from the round number: nothing to remember but the optimiser).
    """
    count = {t: spec.local_steps or spec.local_epochs * n for t, n in per_epoch.items()}
    per_round = sum(count.values())
    if spec.local_steps:
        plan = [
            (t, e, (first, n))
            for t in per_epoch
            for e, first, n in step_plan((spec.round - 1) * count[t], count[t], per_epoch[t])
        ]
    else:
        plan = [
            (t, spec.first_epoch + e, (0, per_epoch[t])) for e in range(spec.local_epochs) for t in per_epoch
        ]
    return plan, (spec.round - 1) * per_round, spec.total_rounds * per_round


def evaluate_round(site: Site, cfg: ExperimentConfig, spec: RoundSpec, arrays: Tensors) -> dict[str, float]:
    """The global model on this site's validation images: `<task>-<metric>` for EVERY federation task (NaN
    and 0 examples for tasks the site lacks), so all sites reply with the same keys."""
    model, device, _ = global_model(site, cfg, spec, _task_model(cfg, spec), arrays, evaluating=True)
    held = site_tasks(site.rows, spec.tasks)
    out: dict[str, float] = {}
    for task in spec.tasks:
        keys = metric_keys(task)
        val_rows = finetune_split(site.rows, task, cfg)[1] if task in held else site.rows.iloc[0:0]
        if len(val_rows):
            val = site_images(site, cfg, cfg.finetune_image_size, "none", rows=val_rows, task=task)
            y, p = predict(model, val, task, device, cfg.finetune.batch_size)
            values = evaluate_predictions(y, p, task, referable_threshold=cfg.finetune.referable_threshold)
            out[f"{task}-num-examples"] = len(y)
        else:
            values = dict.fromkeys(keys, float("nan"))
            out[f"{task}-num-examples"] = 0
        out |= {f"{task}-{k}": float(v) for k, v in values.items()}
    return out


def _persist(
    state: SiteState, model: nn.Module, optimizer: torch.optim.Optimizer, spec: RoundSpec, step: int
) -> None:
    if spec.strategy == "fedbn":
        state.save_bn(model, spec.phase, spec.round)
    state.save_optimizer(optimizer, spec.phase, spec.round)
    state.save_progress(spec, step)


def _train_metrics(images: int, loss: float, steps: int, started: float) -> dict[str, float]:
    seconds = time.perf_counter() - started
    return {
        "num-examples": images,
        "train-loss": loss,
        "steps": steps,
        "duration-s": seconds,
        "images-per-s": images / max(seconds, 1e-9),
    }


def _cpu(state: Tensors) -> Tensors:
    return {k: v.detach().cpu() for k, v in state.items()}
