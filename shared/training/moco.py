"""MoCo v2 pretraining: the model from the config and the method `run_phase` trains (two views per image)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from shared.config import ExperimentConfig
from shared.device import autocast
from shared.errors import ConfigError
from shared.models import build_encoder
from shared.models.moco import MoCo
from shared.training.phase import Method
from shared.training.pretrain import pretraining_method

log = logging.getLogger(__name__)


def build_moco(cfg: ExperimentConfig, encoder: nn.Module | None = None) -> MoCo:
    p = cfg.pretrain
    encoder = encoder if encoder is not None else build_encoder(cfg.model)
    return MoCo(encoder, p.moco_dim, p.moco_queue, p.moco_momentum, p.moco_temperature)


def check_queue(cfg: ExperimentConfig, images: int) -> None:
    """Refuse a queue that outlives an epoch's half: it would hold older keys of the batch's own images as
    negatives, pushing each query away from its own photo (measured with 4,096 keys on 1,746 images: the
    InfoNCE loss rose every epoch)."""
    limit = images // 2
    if cfg.pretrain.moco_queue > limit:
        raise ConfigError(
            f"pretrain.moco_queue {cfg.pretrain.moco_queue} is more than half of the {images} pretraining "
            f"images: set pretrain.moco_queue to at most {limit} (a power of two such as "
            f"{1 << (limit.bit_length() - 1) if limit else 0}) or pretrain on more images"
        )


def moco_method(model: MoCo, cfg: ExperimentConfig, device: torch.device) -> Method:
    """InfoNCE of query views against their key views and the queue, over a `TwoViews` dataset."""
    p = cfg.pretrain
    if p.optimizer == "lamb":
        log.warning(
            "MoCo with LAMB: at the cpu profile's lr (0.03) it left nn-MobileNet untrainable (fine-tuning "
            "stuck at the class prior); simulation/studies/seed2.yaml uses pretrain.optimizer=adamw, "
            "pretrain.base_lr=0.016"
        )

    def loss(
        batch: dict[str, torch.Tensor], g: torch.Generator, task: str
    ) -> tuple[torch.Tensor, int] | None:
        x_q, x_k = batch["image"].to(device), batch["key_image"].to(device)
        if len(x_q) < 2:
            return None
        with autocast(device, p.amp):
            return model(x_q, x_k, g), len(x_q)

    return pretraining_method("moco", model, cfg, loss, clipped=model.query)
