"""SparK pretraining: building the model and optimiser from the config, and one epoch of training.

`pretrain_epoch` is the whole of phase 1: the centralised command calls it once per epoch, the Flower client
once per local epoch of a round, with the same seeds when the data is the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from shared.config import ExperimentConfig
from shared.data.dataset import loader
from shared.device import autocast
from shared.models import build_encoder
from shared.spark.spark import SparK
from shared.training.loop import EpochResult, EpochSeeds, train_epoch
from shared.training.optim import Schedule, make_optimizer

PHASE = "pretrain"


def build_spark(cfg: ExperimentConfig, encoder: torch.nn.Module | None = None) -> SparK:
    p = cfg.pretrain
    return SparK(
        encoder if encoder is not None else build_encoder(cfg.model),
        decoder_width=p.decoder_width,
        mask_ratio=p.mask_ratio,
        norm=cfg.model.norm,
        loss_reduction=p.loss_reduction,
    )


def pretrain_optimizer(model: torch.nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    p = cfg.pretrain
    return make_optimizer(model, p.optimizer, peak_lr(cfg), p.weight_decay, p.betas, p.clip_grad)


def peak_lr(cfg: ExperimentConfig) -> float:
    """SparK's scaling: base_lr * batch / 256."""
    return cfg.pretrain.base_lr * cfg.pretrain.batch_size / 256


def pretrain_schedule(cfg: ExperimentConfig, steps_per_epoch: int, total_steps: int) -> Schedule:
    """Warm-up in epochs of `steps_per_epoch`, then cosine to the end of `total_steps`."""
    p = cfg.pretrain
    total = max(total_steps, 1)
    return Schedule(
        peak_lr(cfg), total, round(p.warmup_epochs * steps_per_epoch), p.weight_decay, p.weight_decay_end
    )


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Full batches per epoch (the last short batch is dropped; at least one batch of >= 2 images)."""
    return max(n_images // batch_size, 1 if n_images >= 2 else 0)


def pretrain_epoch(
    model: SparK,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    dataset: Dataset,
    cfg: ExperimentConfig,
    *,
    epoch: int,
    key: str,
    step: int,
    device: torch.device,
    desc: str = "pretrain",
    penalty: Callable[[], torch.Tensor] | None = None,
    batches: tuple[int, int | None] = (0, None),
) -> EpochResult:
    """One pass over `dataset` (every image, labelled or not), or the window `batches` = (first, count) of
    it; `step` is the global step at its start."""
    p = cfg.pretrain
    seeds = EpochSeeds.of(cfg.seed, PHASE, epoch, key)
    seeds.start(dataset)
    model.train()

    def loss_of(batch: dict[str, torch.Tensor], g: torch.Generator) -> tuple[torch.Tensor, int] | None:
        images = batch["image"].to(device, non_blocking=True)
        if (
            images.shape[0] < 2
        ):  # SE blocks normalise a (B, C, 1, 1) vector: one image has no batch statistics
            return None
        if device.type == "cuda" and p.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, p.amp):
            loss, _, _ = model(images, fov=batch["fov"].to(device, non_blocking=True), generator=g)
        return loss, images.shape[0]

    data = loader(
        dataset, p.batch_size, seed=seeds.order, train=True, workers=cfg.data.workers, batches=batches
    )
    clip = None if p.optimizer == "lamb" else (model.parameters(), p.clip_grad)  # LAMB clips by itself
    return train_epoch(
        data,
        loss_of,
        optimizer,
        schedule.apply,
        seeds=seeds,
        first_batch=batches[0],
        step=step,
        clip=clip,
        desc=f"{desc} epoch {epoch + 1}",
        total=len(data),
        penalty=penalty,
    )
