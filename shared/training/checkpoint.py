"""Training checkpoints in safetensors: model tensors (`model.*`), optimiser state (`optim.*`) and a JSON
record (epoch, step, architecture). Written atomically; loading checks the architecture first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.weights import (
    check_meta,
    flatten_optimizer,
    load_into,
    load_weights,
    save_weights,
    unflatten_optimizer,
)


def save_checkpoint(
    path: Path,
    meta: dict[str, Any],
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    tensors: dict[str, torch.Tensor] = {}
    record = dict(meta)
    if model is not None:
        tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
    if optimizer is not None:
        optim_tensors, optim_meta = flatten_optimizer(optimizer.state_dict())
        tensors.update(optim_tensors)
        record["optimizer"] = optim_meta
    save_weights(path, tensors, record)


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    expected: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore what was asked for from `path`; returns the JSON record."""
    tensors, meta = load_weights(path)
    if expected is not None:
        check_meta(path, meta, expected)
    if model is not None:
        load_into(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    if optimizer is not None:
        optimizer.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
    return meta
