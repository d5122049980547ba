"""SparK pretraining: the model, optimiser and schedule from the config, and the method `run_phase` trains.

`spark_method` is the whole of phase 1: `fedretina pretrain` and a federated site's round both hand it to
`shared.training.phase.run_phase`, with the same seeds when the data is the same.
"""

from __future__ import annotations

import torch

from shared.config import ExperimentConfig
from shared.device import autocast
from shared.models import build_encoder, min_batch
from shared.spark.spark import SparK
from shared.training.optim import Schedule, make_optimizer
from shared.training.phase import LossFn, Method

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


def spark_method(model: SparK | torch.nn.Module, cfg: ExperimentConfig, device: torch.device) -> Method:
    """SparK's masked-patch loss (or MAE's hidden-patch loss: `shared/training/mae.py:MAE` takes the same
    call) on every image of a batch, labelled or not."""
    p = cfg.pretrain

    def loss(
        batch: dict[str, torch.Tensor], g: torch.Generator, task: str
    ) -> tuple[torch.Tensor, int] | None:
        images = batch["image"].to(device, non_blocking=True)
        if images.shape[0] < min_batch(cfg.model):
            return None
        if device.type == "cuda" and p.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, p.amp):
            value, _, _ = model(images, fov=batch["fov"].to(device, non_blocking=True), generator=g)
        return value, images.shape[0]

    return pretraining_method(PHASE, model, cfg, loss)


def pretraining_method(
    streams: str,
    model: torch.nn.Module,
    cfg: ExperimentConfig,
    loss: LossFn,
    clipped: torch.nn.Module | None = None,
) -> Method:
    """A pretraining method (SparK, MoCo, the natural photographs): `loss` under the pretraining recipe's
    batch, optimiser and schedule, the gradient of `clipped` (default: the whole model) clipped to
    `pretrain.clip_grad` unless the optimiser is LAMB, which clips itself."""
    p = cfg.pretrain
    params = list((clipped or model).parameters())
    return Method(
        streams=streams,
        model=model,
        batch_size=p.batch_size,
        loss=loss,
        optimizer=lambda: pretrain_optimizer(model, cfg),
        schedule=lambda per_epoch, total: pretrain_schedule(cfg, per_epoch, total),
        clip=None if p.optimizer == "lamb" else (params, p.clip_grad),
    )
