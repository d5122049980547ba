"""torchvision's ResNet50 exposed as an encoder: five scales for SparK and keys in torchvision's format.

Taps: the stem after conv1/bn1/ReLU (H/2, 64 ch), then layer1..layer4 (H/4..H/32: 256, 512, 1024, 2048).
SparK's own ResNet uses only the last four; we tap the stem too so every encoder feeds all five decoder
blocks.
The module *is* torchvision's ResNet (same state-dict keys), so ImageNet weights saved by torchvision load
into it, and its exported encoder loads back into `torchvision.models.resnet50`.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from shared.models.nnmobilenet import norm_factory
from shared.spark.sparse import MaskedGroupNorm, SparseMask, sparse, sparse_chain


class ResNetEncoder(ResNet):
    downsample_ratio = 32

    def __init__(
        self, num_classes: int | None = None, *, norm: str = "bn", layers: tuple[int, ...] = (3, 4, 6, 3)
    ):
        super().__init__(
            Bottleneck, list(layers), num_classes=num_classes or 1000, norm_layer=norm_factory(norm)
        )
        if num_classes is None:
            del self.fc
        for module in self.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False  # Opacus rejects in-place activations after hooked layers
            if isinstance(module, MaskedGroupNorm):  # torchvision's init treated its affine conv as a conv
                nn.init.ones_(module.affine.weight)
                nn.init.zeros_(module.affine.bias)
        self._channels = [64, 256, 512, 1024, 2048]

    @property
    def feature_channels(self) -> list[int]:
        return list(self._channels)

    def forward_features(self, x: torch.Tensor, mask: SparseMask | None = None) -> list[torch.Tensor]:
        x = self.relu(sparse_chain([self.conv1, self.bn1], x, mask))
        feats = [x]
        x = sparse(self.maxpool, x, mask)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = _bottleneck(block, x, mask)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "fc"):
            raise RuntimeError("built without a head (num_classes=None); use forward_features or TaskModel")
        return super().forward(x)


def _bottleneck(b: Bottleneck, x: torch.Tensor, mask: SparseMask | None) -> torch.Tensor:
    if mask is None:
        return b(x)
    out = b.relu(sparse_chain([b.conv1, b.bn1], x, mask))
    out = b.relu(sparse_chain([b.conv2, b.bn2], out, mask))
    out = sparse_chain([b.conv3, b.bn3], out, mask)
    identity = sparse(b.downsample, x, mask) if b.downsample is not None else x
    return b.relu(out + identity)


def resnet50(num_classes: int | None = None, *, norm: str = "bn") -> ResNetEncoder:
    return ResNetEncoder(num_classes, norm=norm)
