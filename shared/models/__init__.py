"""Encoders for SparK and fine-tuning. Every encoder provides `downsample_ratio` (32), `feature_channels`
(five scales, largest map first, known without a forward pass) and `forward_features(x, mask=None)`."""

from __future__ import annotations

from torch import nn

from shared.config import ModelConfig
from shared.models.heads import ENCODER, ClassifierHead, TaskModel, head_prefix
from shared.models.nnmobilenet import NNMobileNet, nnmobilenet
from shared.models.resnet import ResNetEncoder, resnet50
from shared.models.vit import ViTEncoder

__all__ = [
    "ENCODER",
    "ClassifierHead",
    "NNMobileNet",
    "ResNetEncoder",
    "TaskModel",
    "ViTEncoder",
    "build_encoder",
    "head_prefix",
    "min_batch",
    "nnmobilenet",
    "resnet50",
]


def build_encoder(cfg: ModelConfig) -> nn.Module:
    """The configured encoder, without a head."""
    if cfg.arch == "nnmobilenet":
        return nnmobilenet(cfg.width_mult, None, norm=cfg.norm, dropout2d=cfg.dropout2d)
    if cfg.arch == "resnet50":
        return resnet50(None, norm=cfg.norm)
    return ViTEncoder(cfg.arch)


def min_batch(cfg: ModelConfig) -> int:
    """Images a training step needs: BatchNorm's SE blocks normalise a (B, C, 1, 1) vector, which one image
    cannot; GroupNorm normalises each image alone (and DP-SGD must step on every Poisson batch)."""
    return 2 if cfg.norm == "bn" else 1
