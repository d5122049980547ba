"""nn-MobileNet as the first seed uses it: ReXNet-V1 with spatial dropout after every block.

Structure (width 3.0 = the paper's 30.9M-parameter encoder, 3.39 GMAC at 224 px):
  features.0-2   stem Conv3x3(3 -> 32*w, stride 2) + BN + SiLU                    -> H/2
  features.3-18  16 LinearBottlenecks in groups [1, 2, 2, 3, 3, 5], strides [1, 2, 2, 2, 1, 2],
                 expansion 1 for the first and 6 after, SE on the last four groups; channels grow linearly
                 from 16*w by 180/16*w per block, rounded with Python's banker's `round` (115.5 -> 116)
  features.19-21 "pen" Conv1x1(-> int(1280*w)) + BN + SiLU                        -> H/32
  features.22    global average pool
  out            Dropout(0.2) + Conv1x1(-> classes) (only when num_classes is given)

Block (the paper's ILRB): [1x1 expand + BN + SiLU] -> 3x3 depthwise + BN -> [SE with BN] -> ReLU6 ->
1x1 project + BN (linear); partial residual (the first C_in channels get the input) when stride 1 and
C_in <= C_out; then Dropout2d(p) on the sum (nn-MobileNet's "drop_path": channel dropout, not stochastic
depth). Keys follow ReXNet (`features.*`, head `out.*` as in nn-MobileNet), so ImageNet ReXNet weights load.

SparK taps five scales: features 3 (H/2), 5 (H/4), 7 (H/8), 13 (H/16) and 21 (H/32, after the pen conv so
it is pretrained too): channels [48, 116, 183, 386, 3840] at width 3.0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from shared.spark.sparse import MaskAware, MaskedGroupNorm, SparseMask, masked_mean, sparse, sparse_chain

LAYERS = (1, 2, 2, 3, 3, 5)
STRIDES = (1, 2, 2, 2, 1, 2)
USE_SE = (False, False, True, True, True, True)
SE_RATIO = 12
INPUT_CH, FINAL_CH, STEM_CH, PEN_CH = 16, 180, 32, 1280

NormFactory = Callable[[int], nn.Module]


def norm_factory(norm: str) -> NormFactory:
    """'bn' -> BatchNorm2d (SparK's sparse BN when masked); 'gn' -> per-sample masked GroupNorm (DP)."""
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return MaskedGroupNorm
    raise ValueError(f"unknown norm {norm!r}; use 'bn' or 'gn'")


class SE(MaskAware):
    """Squeeze-excitation; the squeeze averages visible positions only, the excitation stays dense."""

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        mid = channels // SE_RATIO
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        vector_norm = nn.BatchNorm2d(mid) if norm == "bn" else nn.GroupNorm(1, mid)
        self.fc = nn.Sequential(
            nn.Conv2d(channels, mid, 1),
            vector_norm,
            nn.ReLU(),
            nn.Conv2d(mid, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor, mask: SparseMask | None = None) -> torch.Tensor:
        squeezed = self.avg_pool(x) if mask is None else masked_mean(x, mask)
        return x * self.fc(squeezed)


class LinearBottleneck(MaskAware):
    def __init__(self, c_in: int, c_out: int, t: int, stride: int, use_se: bool, norm: str, dropout2d: float):
        super().__init__()
        self.use_shortcut = stride == 1 and c_in <= c_out
        self.in_channels = c_in
        make_norm = norm_factory(norm)
        layers: list[nn.Module] = []
        dw = c_in * t
        if t != 1:
            layers += [nn.Conv2d(c_in, dw, 1, bias=False), make_norm(dw), nn.SiLU()]
        layers += [nn.Conv2d(dw, dw, 3, stride, 1, groups=dw, bias=False), make_norm(dw)]
        if use_se:
            layers.append(SE(dw, norm))
        layers += [nn.ReLU6(), nn.Conv2d(dw, c_out, 1, bias=False), make_norm(c_out)]
        self.out = nn.Sequential(*layers)
        self.drop = nn.Dropout2d(dropout2d)

    def forward(self, x: torch.Tensor, mask: SparseMask | None = None) -> torch.Tensor:
        out = sparse(self.out, x, mask)
        if self.use_shortcut:  # partial residual, out of place (Opacus forbids in-place ops on activations)
            c = self.in_channels
            out = torch.cat([out[:, :c] + x, out[:, c:]], dim=1)
        return self.drop(out)


def channel_plan(width_mult: float) -> tuple[list[int], list[int], int, int]:
    """(block inputs, block outputs, stem channels, pen channels) exactly as ReXNet computes them;
    Python's `round` is banker's rounding (250.5 -> 250), which the reference weights depend on."""
    stem = STEM_CH / width_mult if width_mult < 1.0 else STEM_CH
    inplanes = INPUT_CH / width_mult if width_mult < 1.0 else INPUT_CH
    blocks = sum(LAYERS)
    ins, outs = [], []
    for i in range(blocks):
        if i == 0:
            ins.append(round(stem * width_mult))
            outs.append(round(inplanes * width_mult))
        else:
            ins.append(round(inplanes * width_mult))
            inplanes += FINAL_CH / blocks
            outs.append(round(inplanes * width_mult))
    return ins, outs, round(stem * width_mult), int(PEN_CH * width_mult)


class NNMobileNet(nn.Module):
    downsample_ratio = 32

    def __init__(
        self,
        width_mult: float = 3.0,
        num_classes: int | None = None,
        *,
        norm: str = "bn",
        dropout2d: float = 0.0,
        head_dropout: float = 0.2,
    ) -> None:
        super().__init__()
        ins, outs, stem, pen = channel_plan(width_mult)
        strides = [s if j == 0 else 1 for n, s in zip(LAYERS, STRIDES, strict=True) for j in range(n)]
        ses = [se for n, se in zip(LAYERS, USE_SE, strict=True) for _ in range(n)]
        make_norm = norm_factory(norm)
        features: list[nn.Module] = [nn.Conv2d(3, stem, 3, 2, 1, bias=False), make_norm(stem), nn.SiLU()]
        for i, (c_in, c_out, s, se) in enumerate(zip(ins, outs, strides, ses, strict=True)):
            features.append(LinearBottleneck(c_in, c_out, 1 if i == 0 else 6, s, se, norm, dropout2d))
        features += [
            nn.Conv2d(outs[-1], pen, 1, bias=False),
            make_norm(pen),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
        ]
        self.features = nn.Sequential(*features)
        # Indices into `features` tapped for the five scales: the last block of each resolution, and the pen.
        ends = [3 + sum(LAYERS[: k + 1]) - 1 for k in range(len(LAYERS))]
        self.taps = (ends[0], ends[1], ends[2], ends[4], len(features) - 2)
        self._channels = [outs[e - 3] for e in self.taps[:4]] + [pen]
        self.out = (
            nn.Sequential(nn.Dropout(head_dropout), nn.Conv2d(pen, num_classes, 1)) if num_classes else None
        )

    @property
    def feature_channels(self) -> list[int]:
        """Channels of the five scales, largest map first (a fresh list: callers may mutate it)."""
        return list(self._channels)

    def forward_features(self, x: torch.Tensor, mask: SparseMask | None = None) -> list[torch.Tensor]:
        """Five feature maps H/2 .. H/32, largest first; sparse (masked positions exactly 0) when masked."""
        feats, start = [], 0
        for tap in self.taps:
            x = sparse_chain(list(self.features[start : tap + 1]), x, mask)
            feats.append(x)
            start = tap + 1
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes), as nn-MobileNet's classifier."""
        if self.out is None:
            raise RuntimeError("built without a head (num_classes=None); use forward_features or TaskModel")
        return self.out(self.features(x)).flatten(1)


def nnmobilenet(width_mult: float = 3.0, num_classes: int | None = None, **kwargs: object) -> NNMobileNet:
    """nn-MobileNet at `width_mult` (3.0 = paper size); `norm='gn'` gives the DP-ready encoder."""
    return NNMobileNet(width_mult, num_classes, **kwargs)  # type: ignore[arg-type]
