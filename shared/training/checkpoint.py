"""Training checkpoints and encoder exports in safetensors.

A checkpoint holds model tensors (`model.*`), optimiser state (`optim.*`) and the JSON record of
`shared.weights.weights_meta` (plus epoch, step, ...). Written atomically; loading checks the record first.
An export is the encoder's plain dense state dict, loadable strictly into the fine-tuning model, with the
same record: `fedretina pretrain` and the federated server write it through `export_encoder` alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.config import ExperimentConfig
from shared.weights import (
    check_meta,
    flatten_optimizer,
    load_into,
    load_weights,
    save_weights,
    unflatten_optimizer,
    weights_meta,
)


@dataclass(frozen=True)
class Checkpoint:
    meta: dict[str, Any]
    optimizer: dict[str, Any] | None  # an optimiser's `state_dict()`, when one was saved


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
    path: Path, *, model: nn.Module | None = None, expected: dict[str, Any] | None = None
) -> Checkpoint:
    """The record and optimiser state of `path`, after checking the record against `expected` and loading
    the model tensors into `model` when given."""
    tensors, meta = load_weights(path)
    if expected is not None:
        check_meta(path, meta, expected)
    if model is not None:
        load_into(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    optimizer = unflatten_optimizer(tensors, meta["optimizer"]) if "optimizer" in meta else None
    return Checkpoint(meta, optimizer)


def export_encoder(
    path: Path, encoder: dict[str, torch.Tensor], cfg: ExperimentConfig, **provenance: Any
) -> None:
    """The encoder's state (keys as in `model.encoder`) as `<method>-encoder`, for `finetune.inits`."""
    meta = weights_meta(cfg, f"{cfg.pretrain.method}-encoder", **provenance)
    save_weights(path, encoder, meta)
