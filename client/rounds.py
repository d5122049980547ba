"""What a site does in one federated round, without Flower: `run_phase`, the function centralised training
calls, over the site's own images for the round's span of the phase, from the global weights.

The site's state between rounds (optimiser moments, FedBN layers, progress) is `client/state.py`'s.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from client.privacy import SitePrivacy
from client.state import SiteState
from shared.data.site import Site
from shared.device import configure_torch, pick_device
from shared.errors import ConfigError
from shared.federation.strategies import strategy_of
from shared.federation.wire import (
    DEVICES,
    EPSILON,
    NUM_EXAMPLES,
    PRETRAIN,
    RATE,
    SECONDS,
    STEPS,
    TRAIN_LOSS,
    RoundSpec,
    task_key,
)
from shared.models import ENCODER, head_prefix
from shared.privacy.sgd import PrivateSGD
from shared.training.control import ControlVariates
from shared.training.data import site_images
from shared.training.finetune import (
    build_task_model,
    classifier_method,
    finetune_split,
    score_rows,
    site_tasks,
    site_test_rows,
    task_weights,
)
from shared.training.moments import MimeMoments, named_moments, with_moments
from shared.training.phase import Method, Span, run_phase
from shared.training.pretrain import build_spark, spark_method
from shared.training.replicas import Replica, run_replicas
from shared.weights import load_into

Tensors = dict[str, torch.Tensor]
log = logging.getLogger(__name__)


def train_round(site: Site, spec: RoundSpec, arrays: Tensors, carried: Tensors | None = None) -> Trained:
    """The round's local epochs (or steps) from the global weights: the weights to send (all of them in
    pretraining; the encoder and this site's heads in fine-tuning) and the reply's metrics. Under DP the
    site may refuse (its budget), and its epsilon joins the metrics. With `federation.carry_optimizer` the
    site starts from the `carried` optimiser moments of the site before it in the chain (its own state for
    parameters they lack) and returns its moments to hand on; under MimeLite (`mime`) `carried` are the
    server's moments, held fixed through the round, and it returns what its gradients make of them."""
    started = time.perf_counter()
    privacy = SitePrivacy(site, spec) if spec.config.privacy.enabled else None
    sgd, refused = privacy.refusal() if privacy is not None else (None, None)
    if privacy is not None and sgd is None:
        log.warning("%s: %s", site.name, refused)
        return Trained(None, refused_metrics(spec, privacy.epsilon, time.perf_counter() - started), refused)
    devices = site.config.devices
    if devices > 1 and sgd is not None:
        raise ConfigError(
            f"site {site.name}: devices: {devices} cannot train with DP-SGD (Opacus clips per sample on one "
            "device); set devices: 1 in the site YAML for private runs"
        )
    if devices > 1:
        cuda = pick_device(spec.config.device).type == "cuda"
        plain = _numpy(arrays), _numpy(carried) if carried is not None else None
        local = run_replicas(_train_replica, devices, (site, spec, *plain), cuda).as_tensors()
    else:
        local = _train(site, spec, arrays, carried, sgd=sgd)
    spent = {EPSILON: privacy.release(sgd)} if privacy is not None and sgd is not None else {}
    images = sum(local.counts.values())
    seconds = time.perf_counter() - started
    metrics = {
        NUM_EXAMPLES: images,
        TRAIN_LOSS: local.loss,
        STEPS: local.steps,
        SECONDS: seconds,
        RATE: images / max(seconds, 1e-9),
        DEVICES: devices,
    }
    counts = {task_key(t, NUM_EXAMPLES): local.counts.get(t, 0) for t in spec.tasks}
    return Trained(local.weights, metrics | counts | spent, moments=local.moments)


@dataclass(frozen=True)
class Local:
    """What the local training of a round produced: the weights to send, the loss, the optimiser steps,
    the training images per task, and the optimiser moments to hand on (carry_optimizer)."""

    weights: dict[str, Any]
    loss: float
    steps: int
    counts: dict[str, int]
    moments: dict[str, Any] | None = None

    def as_tensors(self) -> Local:
        """Back from the numpy arrays a replica process sent (plain bytes, no shared memory)."""
        moments = _from_numpy(self.moments) if self.moments is not None else None
        return replace(self, weights=_from_numpy(self.weights), moments=moments)

    def as_numpy(self) -> Local:
        moments = _numpy(self.moments) if self.moments is not None else None
        return replace(self, weights=_numpy(self.weights), moments=moments)


def _numpy(tensors: Tensors) -> dict[str, Any]:
    return {k: v.numpy() for k, v in tensors.items()}


def _from_numpy(arrays: dict[str, Any]) -> Tensors:
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def _train(
    site: Site,
    spec: RoundSpec,
    arrays: Tensors,
    carried: Tensors | None = None,
    *,
    sgd: PrivateSGD | None = None,
    replica: Replica | None = None,
) -> Local:
    """The round's training on this process's device (one of several when `replica` is given; the first
    keeps the site's state)."""
    cfg, f = spec.config, spec.config.federation
    plan = strategy_of(f.strategy)
    device = replica.configure(cfg) if replica is not None else configure_torch(cfg)
    state = SiteState(site, spec)
    model, data = _work(site, spec)
    _load_global(model, arrays, state, spec.round - 1)
    method = _method(model.to(device), data, spec, device)
    mime = MimeMoments(model, carried or {}) if plan.server_moments else None  # the server's, held fixed
    own = state.controls_before() if plan.control_variates else {}  # SCAFFOLD: the site's own variates
    scaffold = ControlVariates(model, carried or {}, own) if plan.control_variates else None  # held fixed
    hook = mime or scaffold
    chained = None if plan.server_state else carried  # the previous site's moments, along a chain
    result = run_phase(
        method,
        data,
        round_span(spec),
        seed=cfg.seed,
        key=site.name,
        workers=cfg.data.workers,
        optimizer_state=None if mime else _optimizer_state(method, state.optimizer_before(), chained),
        proximal_mu=f.proximal_mu if plan.proximal else 0.0,  # FedProx's term, at the site
        desc=site.name if replica is None else f"{site.name} device {replica.rank}",
        privacy=sgd,
        replica=replica,
        on_optimizer=hook.attach if hook else None,
    )
    keeps = replica is None or replica.rank == 0  # the process whose result the site keeps and sends
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if spec.phase != PRETRAIN:  # the encoder and the heads this site trained; other heads stay the server's
        weights = {k: v for k, v in weights.items() if k.startswith((ENCODER, *map(head_prefix, data)))}
    controls = scaffold.controls(weights) if scaffold is not None else None
    if keeps:  # every variate the site holds, this round's replacing the ones it steps
        state.after_round(
            model, result.optimizer, result.step, own | controls if controls is not None else None
        )
    moments = None  # what travels back with the weights, if anything
    if keeps and scaffold is not None:
        moments = controls
    elif keeps and mime is not None:
        moments = mime.moments(weights)
    elif keeps and f.carry_optimizer:
        moments = named_moments(model, result.optimizer, weights)
    return Local(weights, result.loss, result.steps, {t: len(d) for t, d in data.items()}, moments)


def _optimizer_state(method: Method, own: dict | None, carried: Tensors | None) -> dict | None:
    """The optimiser state a round starts from: the site's own (or None: fresh), with the carried moments
    of the previous site in the chain over it."""
    if carried is None:
        return own
    optimizer = method.optimizer()
    if own is not None:
        optimizer.load_state_dict(own)
    return with_moments(optimizer, method.model, carried)


def _train_replica(
    replica: Replica, site: Site, spec: RoundSpec, arrays: dict[str, Any], carried: dict[str, Any] | None
) -> Local:
    """One device's process of a multi-device site (see shared/training/replicas.py)."""
    moments = _from_numpy(carried) if carried is not None else None
    return _train(site, spec, _from_numpy(arrays), moments, replica=replica).as_numpy()


@dataclass(frozen=True)
class Trained:
    """A train round's outcome: weights and metrics, or (weights None) why the site refused the round;
    with carry_optimizer, the optimiser moments to hand on."""

    weights: Tensors | None
    metrics: dict[str, float]
    refused: str | None = None
    moments: Tensors | None = None


def refused_metrics(spec: RoundSpec, spent: float, seconds: float) -> dict[str, float]:
    """A refusing site's reply still carries every metric key a train reply has (no work, its epsilon)."""
    counts = {task_key(t, NUM_EXAMPLES): 0 for t in spec.tasks}
    zero = {NUM_EXAMPLES: 0, TRAIN_LOSS: math.nan, STEPS: 0, SECONDS: seconds, RATE: 0.0, DEVICES: 0}
    return zero | counts | {EPSILON: spent}


def round_span(spec: RoundSpec) -> Span:
    """This round's part of the phase: the slicing a centralised run of all the rounds would do."""
    f = spec.config.federation
    return Span.round(spec.round, spec.rounds, f.local_epochs, f.steps_in(spec.phase))


def evaluate_round(site: Site, spec: RoundSpec, arrays: Tensors, test: bool = False) -> dict[str, float]:
    """The global model on this site's validation images, or (`test`: the run's final evaluation) on its
    held-out test patients, which no round trained on or selected by: `<task>-<metric>` for EVERY federation
    task (NaN and 0 examples for tasks the site lacks), so all sites reply with the same keys."""
    cfg = spec.config
    device = configure_torch(cfg)
    model = build_task_model(cfg, spec.tasks)
    _load_global(model, arrays, SiteState(site, spec), spec.round)  # FedBN: this round's own layers
    model.to(device)
    held = site_tasks(site.rows, tuple(spec.tasks))
    out: dict[str, float] = {}
    for task in spec.tasks:
        if task not in held:
            rows = site.rows.iloc[0:0]
        else:
            rows = site_test_rows(site, task) if test else finetune_split(site.rows, task, cfg)[1]
        values = score_rows(model, site, cfg, task, rows, device)
        out[task_key(task, NUM_EXAMPLES)] = len(rows)
        out |= {task_key(task, k): float(v) for k, v in values.items()}
    return out


def _work(site: Site, spec: RoundSpec) -> tuple[nn.Module, dict[str, Dataset]]:
    """The round's model (before its weights) and this site's training images, keyed by task."""
    cfg = spec.config
    if spec.phase == PRETRAIN:
        return build_spark(cfg), {"": site_images(site, cfg, cfg.data.image_size, "light")}
    rows = {t: finetune_split(site.rows, t, cfg)[0] for t in site_tasks(site.rows, tuple(spec.tasks))}
    data = {
        t: site_images(site, cfg, cfg.finetune_image_size, cfg.finetune.augment, rows=r, task=t)
        for t, r in rows.items()
    }
    return build_task_model(cfg, spec.tasks), data


def _method(model: nn.Module, data: dict[str, Dataset], spec: RoundSpec, device: torch.device) -> Method:
    cfg = spec.config
    if spec.phase == PRETRAIN:
        return spark_method(model, cfg, device)  # type: ignore[arg-type]
    weights = task_weights({t: d.rows for t, d in data.items()}, spec.tasks, cfg)  # type: ignore[attr-defined]
    return classifier_method(model, cfg, device, weights)  # type: ignore[arg-type]


def _load_global(model: nn.Module, arrays: Tensors, state: SiteState, bn_round: int) -> None:
    """The global weights, strictly; under FedBN the site's own BatchNorm after round `bn_round`."""
    load_into(model, arrays, Path("global model"))
    if state.fedbn:
        state.load_bn(model, bn_round)
