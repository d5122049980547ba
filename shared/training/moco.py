"""MoCo v2 pretraining: the model from the config and the method `run_phase` trains (two views per image)."""

from __future__ import annotations

import torch
from torch import nn

from shared.config import ExperimentConfig
from shared.device import autocast
from shared.models import build_encoder
from shared.models.moco import MoCo
from shared.training.phase import Method
from shared.training.pretrain import pretrain_optimizer, pretrain_schedule


def build_moco(cfg: ExperimentConfig, encoder: nn.Module | None = None) -> MoCo:
    p = cfg.pretrain
    encoder = encoder if encoder is not None else build_encoder(cfg.model)
    return MoCo(encoder, p.moco_dim, p.moco_queue, p.moco_momentum, p.moco_temperature)


def moco_method(model: MoCo, cfg: ExperimentConfig, device: torch.device) -> Method:
    """InfoNCE of query views against their key views and the queue, over a `TwoViews` dataset."""
    p = cfg.pretrain

    def loss(
        batch: dict[str, torch.Tensor], g: torch.Generator, task: str
    ) -> tuple[torch.Tensor, int] | None:
        x_q, x_k = batch["image"].to(device), batch["key_image"].to(device)
        if len(x_q) < 2:
            return None
        with autocast(device, p.amp):
            return model(x_q, x_k, g), len(x_q)

    return Method(
        streams="moco",
        model=model,
        batch_size=p.batch_size,
        loss=loss,
        optimizer=lambda: pretrain_optimizer(model, cfg),
        schedule=lambda per_epoch, total: pretrain_schedule(cfg, per_epoch, total),
        clip=None if p.optimizer == "lamb" else (list(model.query.parameters()), p.clip_grad),
    )
