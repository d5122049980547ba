"""Weights at rest and on the wire: safetensors files (no pickle, ever) that describe themselves.

Every file carries a JSON metadata record (architecture, widths, norm, what it holds), so loading into the
wrong model fails with one line saying what differs instead of a wall of missing keys. Optimiser state is
flattened into tensors plus JSON, so checkpoints need no pickle either.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from shared.errors import CheckpointError

META_KEY = "fedretina"
ARCH_KEYS = ("arch", "width_mult", "norm")  # what must agree between a file and the model it loads into


def save_weights(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write tensors + metadata atomically (a crash leaves the previous file, never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(flat, tmp, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file (no pickle); missing or unreadable files are one-line `CheckpointError`s."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        tensors = load_file(path)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY, "{}")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors, json.loads(raw)


def model_meta(cfg: Any) -> dict[str, Any]:
    """The architecture record of a `ModelConfig`, stored in every file."""
    return {"arch": cfg.arch, "width_mult": cfg.width_mult, "norm": cfg.norm}


def check_meta(path: Path, meta: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a file whose architecture differs from the model's, naming each difference."""
    diffs = [
        f"{k}={meta.get(k)!r} (model has {expected[k]!r})"
        for k in ARCH_KEYS
        if meta.get(k) != expected.get(k)
    ]
    if diffs:
        raise CheckpointError(f"{path}: weights are for another architecture: {', '.join(diffs)}")


def load_into(
    module: nn.Module, tensors: dict[str, torch.Tensor], path: Path, *, strict: bool = True
) -> None:
    """`load_state_dict` with shape and key problems reported in one line."""
    own = module.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in tensors.items()
        if k in own and own[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(
            f"{path}: {len(wrong)} tensors have other shapes than the model's, e.g. {wrong[0]}"
        )
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path}: keys do not match the model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    module.load_state_dict(tensors, strict=strict)


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser `state_dict()` as tensors (`optim.<param>.<name>`) plus JSON-able param groups."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, float]] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, entries in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}
