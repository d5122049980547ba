"""Weights at rest and on the wire: safetensors files (no pickle, ever) that describe themselves.

Every file carries one JSON record, written by `weights_meta` (what it holds, the architecture, the settings
that shaped it, its provenance), so loading into the wrong model fails with one line saying what differs
instead of a wall of missing keys, and a resumed run refuses changed settings by name. Optimiser state is
flattened into tensors plus JSON, so checkpoints need no pickle either.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from shared.config import (
    OPERATIONAL,
    ExperimentConfig,
    ModelConfig,
    shaping_settings,
    validate,
    without,
)
from shared.errors import CheckpointError

META_KEY = "fedretina"


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
        with safe_open(path, framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY, "{}")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{path}: its {META_KEY!r} metadata is not a JSON record; not a file fedretina wrote (or damaged)"
        )
    return tensors, meta


def model_meta(cfg: ModelConfig) -> dict[str, Any]:
    """The architecture record of a `ModelConfig`: what must agree between a file and its model."""
    return {"arch": cfg.arch, "width_mult": cfg.width_mult, "norm": cfg.norm}


def weights_meta(cfg: ExperimentConfig, kind: str, **provenance: Any) -> dict[str, Any]:
    """The record every weights file we write carries (checkpoints, exports, models, a site's state): what
    it holds (`kind`), the architecture, every setting that shaped it (`settings`, dotted keys), and where
    it comes from (epochs, round, tasks, ...)."""
    return {"kind": kind, **model_meta(cfg.model), "settings": shaping_settings(cfg), **provenance}


def check_meta(path: Path, meta: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a file whose record differs from `expected` on any of its keys, naming each difference."""
    diffs = [f"{k}={meta.get(k)!r} (wanted {v!r})" for k, v in expected.items() if meta.get(k) != v]
    if diffs:
        raise CheckpointError(f"{path}: these weights do not fit: {', '.join(diffs)}")


def config_of(path: Path, meta: dict[str, Any]) -> ExperimentConfig:
    """The configuration a weights file was made with, rebuilt from its record's settings (operational keys
    such as the device take their defaults): a model file says how to build and read the model it holds."""
    if not isinstance(meta.get("settings"), dict):
        raise CheckpointError(f"{path}: records no settings (an older fedretina, or not a model it wrote)")
    nested: dict[str, Any] = {}
    for dotted, value in meta["settings"].items():
        *parents, leaf = str(dotted).split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"{path}: its recorded setting {dotted!r} collides with another")
        node[leaf] = value
    return validate(ExperimentConfig, nested, f"{path} (its recorded settings)")


def check_settings(
    path: Path, meta: dict[str, Any], cfg: ExperimentConfig, free: tuple[str, ...] = ()
) -> None:
    """Refuse to continue from `path` when a setting that shapes the result differs from the file's (keys in
    `free` may change); the message names every key that changed."""
    if "settings" not in meta:
        raise CheckpointError(
            f"{path}: written by an older fedretina (it records no settings); start another run"
        )
    saved, now = without(meta["settings"], OPERATIONAL + free), shaping_settings(cfg, free)
    changed = [
        f"{k}={saved.get(k, '(unset)')!r} (now {now.get(k, '(unset)')!r})"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    if changed:
        raise CheckpointError(
            f"{path} was made with other settings: {', '.join(changed)}; "
            "continue with the run's own settings, or start another run"
        )


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
