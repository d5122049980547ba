"""Reconstruction previews: a PNG grid with, per image, the input, the masked input and the reconstruction."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from shared.spark.spark import SparK
from shared.spark.sparse import SparseMask


@torch.no_grad()
def save_preview(
    path: Path, model: SparK, images: torch.Tensor, mean: Sequence[float], std: Sequence[float], seed: int = 0
) -> None:
    """Rows: input | masked input (hidden patches grey) | reconstruction. Uses eval mode and a fixed mask."""
    was_training = model.training
    model.eval()
    mask = model.draw_mask(images, torch.Generator().manual_seed(seed))
    _, rec, _ = model(images, mask)
    model.train(was_training)
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    visible = SparseMask(mask).at(images.shape[-2], images.shape[-1]).to(images.device)
    shown = [x * s + m for x in (images, images * visible, rec)]
    shown[1] = shown[1] * visible + 0.5 * (1 - visible)
    grid = make_grid(torch.cat(shown).clamp(0, 1).float().cpu(), nrow=images.shape[0], padding=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
