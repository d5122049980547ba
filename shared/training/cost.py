"""What a training step costs in arithmetic: FLOPs per image of one step's forward and backward pass, as
executed, counted by torch's `FlopCounterMode` (matrix products and convolutions; SparK's masked-dense
emulation counts the dense convolutions it runs, MAE's encoder only the visible patches it sees). This is
how the first seed's study puts SparK and a ViT-MAE on the same compute axis beside their wall-clock."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch.utils.data import Dataset, default_collate
from torch.utils.flop_counter import FlopCounterMode

from shared.training.phase import Method


def flops_per_image(
    build: Callable[[torch.nn.Module], Method], model: torch.nn.Module, data: Dataset, images: int = 4
) -> float:
    """FLOPs per image of one training step of the method `build` makes for `model`, on the first `images`
    items of `data`. A copy of the model is stepped (forward and backward, no optimiser step), so neither
    its weights nor its BatchNorm statistics move, and torch's global random state (dropout) is restored."""
    batch = default_collate([data[i] for i in range(min(images, len(data)))])
    method = build(copy.deepcopy(model))
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
        out = method.loss(batch, torch.Generator().manual_seed(0), "")
        if out is None:
            raise ValueError(f"a batch of {images} images is too small for this method")
        value, count = out
        value.backward()
    return counter.get_total_flops() / count
