"""Centralised training on pooled site data: the `fedretina pretrain` / `finetune` commands, and the
reference the federated simulation must reproduce (same functions, same seeds, same number of steps)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.config import ExperimentConfig
from shared.data.dataset import TwoViews
from shared.data.manifest import held_tasks, task_classes
from shared.data.site import Site
from shared.data.transforms import FUNDUS_MEAN, FUNDUS_STD
from shared.device import configure_torch
from shared.errors import CheckpointError
from shared.moco import moco_epoch
from shared.plots import curve
from shared.rundir import atomic_write_text, run_dir, start_run_dir
from shared.seeding import derive_seed, seed_everything
from shared.spark.preview import save_preview
from shared.training.checkpoint import load_checkpoint, save_checkpoint
from shared.training.data import load_sites, pooled, site_images
from shared.training.finetune import (
    build_task_model,
    finetune_epoch,
    finetune_optimizer,
    finetune_schedule,
    finetune_split,
    site_tasks,
)
from shared.training.init import check_init, pretraining_start
from shared.training.loop import data_key
from shared.training.pretrain import (
    pretrain_epoch,
    pretrain_optimizer,
    pretrain_schedule,
    steps_per_epoch,
)
from shared.weights import model_meta, save_weights

log = logging.getLogger(__name__)
PREVIEW_IMAGES = 6


@dataclass(frozen=True)
class PretrainOutputs:
    encoder: Path
    losses: list[float]
    directory: Path


def run_pretraining(cfg: ExperimentConfig, *, resume: bool = False) -> PretrainOutputs:
    """Pretrain (SparK, or MoCo v2) on the pooled images of `cfg.sites`; resumable at epoch boundaries."""
    checkpoint = run_dir(cfg, "pretrain") / "checkpoint.safetensors"
    if checkpoint.exists() and not resume:
        raise CheckpointError(
            f"{checkpoint} exists: pass --resume to continue that run, or pick another --name"
        )
    check_init(cfg.pretrain.init.kind, cfg.pretrain.init.weights, cfg.model)
    out = start_run_dir(cfg, "pretrain")
    sites = load_sites(cfg.sites)
    spark = cfg.pretrain.method == "spark"
    views = [site_images(s, cfg, cfg.data.image_size, "light" if spark else "contrastive") for s in sites]
    dataset = pooled(views if spark else [TwoViews(v) for v in views])
    key = data_key([s.name for s in sites])
    device = configure_torch(cfg)
    model = pretraining_start(cfg).to(device)
    optimizer = pretrain_optimizer(model, cfg)
    per_epoch = steps_per_epoch(len(dataset), cfg.pretrain.batch_size)
    schedule = pretrain_schedule(cfg, per_epoch, per_epoch * cfg.pretrain.epochs)
    method = cfg.pretrain.method
    meta = {**model_meta(cfg.model), "method": method, "image_size": cfg.data.image_size}
    start, step, losses = 0, 0, []
    if resume and checkpoint.exists():
        state = load_checkpoint(checkpoint, model=model, optimizer=optimizer, expected=meta)
        start, step, losses = state["epoch"], state["step"], state["losses"]
        log.info("resuming %s after epoch %d (step %d)", out, start, step)
    preview = _preview_batch(sites, cfg).to(device) if spark else None
    log.info(
        "%s pretraining on %d images from %s, %d steps per epoch, device %s",
        method,
        len(dataset),
        key,
        per_epoch,
        device,
    )
    epoch_fn = pretrain_epoch if spark else moco_epoch
    for epoch in range(start, cfg.pretrain.epochs):
        result = epoch_fn(
            model, optimizer, schedule, dataset, cfg, epoch=epoch, key=key, step=step, device=device
        )
        step += result.steps
        losses.append(result.loss)
        log.info(
            "epoch %d/%d  loss %.4f  %.1f img/s", epoch + 1, cfg.pretrain.epochs, result.loss, result.rate
        )
        last = epoch + 1 == cfg.pretrain.epochs
        if last or (epoch + 1) % cfg.pretrain.checkpoint_every == 0:
            state = {
                **meta,
                "kind": f"{method}-checkpoint",
                "epoch": epoch + 1,
                "step": step,
                "losses": losses,
            }
            save_checkpoint(checkpoint, state, model=model, optimizer=optimizer)
        every = cfg.pretrain.preview_every
        if preview is not None and (last or (every and (epoch + 1) % every == 0)):
            save_preview(
                out / "previews" / f"epoch{epoch + 1:04d}.png", model, preview, FUNDUS_MEAN, FUNDUS_STD
            )
    encoder = out / "encoder.safetensors"
    save_weights(
        encoder, model.encoder.state_dict(), {**meta, "kind": f"{method}-encoder", "epochs": len(losses)}
    )
    _history(out, losses, "masked-patch loss" if spark else "InfoNCE loss")
    log.info("encoder exported to %s", encoder)
    return PretrainOutputs(encoder, losses, out)


def _preview_batch(sites: list[Site], cfg: ExperimentConfig) -> torch.Tensor:
    """The same few images every time (the first of the first site), unaugmented."""
    rows = sites[0].rows.head(PREVIEW_IMAGES)
    data = site_images(sites[0], cfg, cfg.data.image_size, "none", rows=rows)
    return torch.stack([data[i]["image"] for i in range(len(data))])


def _history(out: Path, losses: list[float], label: str) -> None:
    lines = [f"epoch,{label.replace(' ', '_')}", *(f"{i + 1},{loss:.6f}" for i, loss in enumerate(losses))]
    atomic_write_text(out / "history.csv", "\n".join(lines) + "\n")
    curve(out / "loss.png", {label: losses}, xlabel="epoch", ylabel="loss", title="pretraining")


@dataclass(frozen=True)
class ReferenceOutputs:
    pretrained: dict[str, torch.Tensor]  # SparK state after phase 1
    finetuned: dict[str, torch.Tensor]  # task-model state after phase 2
    tasks: dict[str, int]
    seconds: dict[str, list[float]]  # wall time of each epoch, by phase


def reference_run(cfg: ExperimentConfig, sites: list[Site]) -> ReferenceOutputs:
    """Both federated phases, centralised: the pooled images of `sites`, the same functions, seeds, initial
    weights and number of steps as `flwr run .` with every site in every round. One site holding all the data
    with one local epoch per round must give bitwise what the federation gives (the exactness check)."""
    f = cfg.federation
    device = configure_torch(cfg)
    key = data_key([s.name for s in sites])
    spark = pretraining_start(cfg).to(device)
    optimizer = pretrain_optimizer(spark, cfg)
    dataset = pooled([site_images(s, cfg, cfg.data.image_size, "light") for s in sites])
    epochs = f.rounds_pretrain * f.local_epochs
    per_epoch = steps_per_epoch(len(dataset), cfg.pretrain.batch_size)
    schedule = pretrain_schedule(cfg, per_epoch, per_epoch * epochs)
    step, seconds = 0, {"pretrain": [], "finetune": []}
    for epoch in range(epochs):
        result = pretrain_epoch(
            spark, optimizer, schedule, dataset, cfg, epoch=epoch, key=key, step=step, device=device
        )
        step += result.steps
        seconds["pretrain"].append(result.seconds)
    tasks = _held_tasks(cfg, sites)
    seed_everything(derive_seed(cfg.seed, "init-finetune"))
    model = build_task_model(cfg, tasks).to(device)
    encoder = {k: v for k, v in spark.state_dict().items() if k.startswith("encoder.")}
    model.load_state_dict({**model.state_dict(), **encoder})
    optimizer = finetune_optimizer(model, cfg)
    data = {}
    for task in tasks:
        parts = [
            site_images(
                s,
                cfg,
                cfg.finetune_image_size,
                cfg.finetune.augment,
                rows=finetune_split(s.rows, task, cfg)[0],
                task=task,
            )
            for s in sites
            if task in site_tasks(s.rows, (task,))
        ]
        data[task] = pooled(parts)
    per_epoch = sum(steps_per_epoch(len(d), cfg.finetune.batch_size) for d in data.values())
    schedule = finetune_schedule(cfg, per_epoch, per_epoch * f.rounds_finetune * f.local_epochs)
    step = 0
    for epoch in range(f.rounds_finetune * f.local_epochs):
        started = time.perf_counter()
        for task, dataset in data.items():
            step += finetune_epoch(
                model,
                optimizer,
                schedule,
                dataset,
                cfg,
                task=task,
                epoch=epoch,
                key=f"{key}:{task}",
                step=step,
                device=device,
            ).steps
        seconds["finetune"].append(time.perf_counter() - started)
    return ReferenceOutputs(_cpu(spark), _cpu(model), tasks, seconds)


def _cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _held_tasks(cfg: ExperimentConfig, sites: list[Site]) -> dict[str, int]:
    """Phase 2's tasks as the server picks them: configured, or every task some site holds labels for."""
    classes = {t: k for s in sites for t, k in task_classes(s.rows).items() if t in held_tasks(s.rows)}
    wanted = cfg.federation.tasks or tuple(sorted(classes))
    return {t: classes[t] for t in wanted}
