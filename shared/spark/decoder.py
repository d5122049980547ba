"""SparK's light UNet decoder: log2(32) = 5 upsampling blocks from H/32 back to H, a skip from each scale.

Widths halve per block from `width` (768 in the paper profile: 23.2M parameters): w, w/2, ..., w/32, then a
1x1 conv to RGB. Block = ConvTranspose(4, stride 2) -> Conv3x3 -> norm -> ReLU6 -> Conv3x3 -> norm. The
first seed's text says "4 upsampling blocks"; with five encoder scales every one of the 5 blocks gets a skip,
which is how we count (DESIGN.md).
"""

from __future__ import annotations

import torch
from torch import nn


def vector_norm(channels: int, norm: str) -> nn.Module:
    """BatchNorm for the decoder, or GroupNorm (per sample) under DP."""
    return nn.BatchNorm2d(channels) if norm == "bn" else nn.GroupNorm(_groups(channels), channels)


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


class UNetBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str) -> None:
        super().__init__(
            nn.ConvTranspose2d(cin, cin, 4, 2, 1, bias=True),
            nn.Conv2d(cin, cin, 3, 1, 1, bias=False),
            vector_norm(cin, norm),
            nn.ReLU6(),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            vector_norm(cout, norm),
        )


class LightDecoder(nn.Module):
    def __init__(self, width: int = 768, blocks: int = 5, norm: str = "bn") -> None:
        super().__init__()
        widths = [max(width // 2**i, 1) for i in range(blocks + 1)]
        self.widths = widths
        self.dec = nn.ModuleList(UNetBlock(widths[i], widths[i + 1], norm) for i in range(blocks))
        self.proj = nn.Conv2d(widths[-1], 3, 1, bias=True)
        self.apply(_init)

    def forward(self, to_dec: list[torch.Tensor]) -> torch.Tensor:
        """`to_dec` smallest map first (H/32, ...); returns the reconstruction (B, 3, H, W), normalised."""
        x: torch.Tensor | float = 0.0
        for i, block in enumerate(self.dec):
            if i < len(to_dec):
                x = x + to_dec[i]
            x = block(x)
        return self.proj(x)


def _init(m: nn.Module) -> None:
    """SparK's decoder init: Conv2d truncated normal 0.02 and zero bias; ConvTranspose2d Kaiming (fan_out)."""
    if isinstance(m, nn.Conv2d):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.ConvTranspose2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
