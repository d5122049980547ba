"""SparK's random patch mask: per sample, exactly round(grid^2 * (1 - ratio)) visible patches.

With a 7x7 grid and ratio 0.6, 20 of 49 patches stay visible (the real mask ratio is 59.2%). True = visible.
The noise is drawn on the CPU from an explicit generator, so masks are reproducible and thread-safe.
"""

from __future__ import annotations

import torch


def visible_count(grid: int, ratio: float) -> int:
    return max(1, round(grid * grid * (1 - ratio)))


def random_mask(
    batch: int, grid: int, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A bool mask (batch, 1, grid, grid), True = visible, each sample drawn independently."""
    keep = visible_count(grid, ratio)
    noise = torch.rand(batch, grid * grid, generator=generator)
    order = noise.argsort(dim=1)
    active = torch.zeros(batch, grid * grid, dtype=torch.bool)
    active.scatter_(1, order[:, :keep], True)
    return active.view(batch, 1, grid, grid)
