"""Supervised pretraining on natural photographs (`pretrain.method: natural`), the stand-in for ImageNet
weights: the encoder with one head over the photographs (shared/data/photos.py), trained by cross-entropy
with the pretraining optimiser and schedule. Only the encoder is exported, as ImageNet heads are dropped."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.config import ExperimentConfig
from shared.data.photos import PHOTOS, NaturalCrops
from shared.device import autocast
from shared.models import TaskModel, build_encoder, min_batch
from shared.training.phase import Method
from shared.training.pretrain import pretraining_method

TASK = "photo"  # the head's name: which photograph a crop comes from


def build_natural(cfg: ExperimentConfig, encoder: torch.nn.Module | None = None) -> TaskModel:
    encoder = encoder if encoder is not None else build_encoder(cfg.model)
    return TaskModel(encoder, {TASK: len(PHOTOS)}, cfg.model.head_dropout)


def natural_images(cfg: ExperimentConfig) -> NaturalCrops:
    return NaturalCrops(cfg.data.image_size, cfg.pretrain.natural_crops)


def natural_method(model: TaskModel, cfg: ExperimentConfig, device: torch.device) -> Method:
    """Cross-entropy of the photograph each crop comes from."""
    p = cfg.pretrain

    def loss(
        batch: dict[str, torch.Tensor], g: torch.Generator, task: str
    ) -> tuple[torch.Tensor, int] | None:
        images, labels = batch["image"].to(device), batch["label"].to(device)
        if images.shape[0] < min_batch(cfg.model):
            return None
        with autocast(device, p.amp):
            logits = model(images, TASK)
        return F.cross_entropy(logits.float(), labels), images.shape[0]

    return pretraining_method("natural", model, cfg, loss)
