"""The models an analysis reads: `--model NAME=PATH` options naming weights files of ours, each rebuilt from
its own record (arch, width, norm) and loaded strictly, checked before any data work."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from shared.config import ModelConfig
from shared.errors import CheckpointError, ConfigError
from shared.models import TaskModel, build_encoder
from shared.names import LABEL
from shared.weights import load_into, load_weights

TASK = "dr"  # robustness and relevance read the DR head
log = logging.getLogger(__name__)


def parse_models(specs: Sequence[str]) -> dict[str, Path]:
    """`NAME=PATH` options as {name: path}, in the order given; bad or repeated names are `ConfigError`s."""
    if not specs:
        raise ConfigError("--model: give at least one model as NAME=PATH, e.g. --model fs=model.safetensors")
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path or not LABEL.fullmatch(name):
            raise ConfigError(
                f"--model {spec!r}: expected NAME=PATH, NAME of letters, digits, '.', '-' or '_' "
                "(e.g. --model IWNE-FS=runs/fs/finetune/checkpoints/scratch_100pct_fold0.safetensors)"
            )
        if name in models:
            raise ConfigError(f"--model {spec!r}: the name {name!r} is given twice; name each model once")
        models[name] = Path(path)
    return models


def load_model(name: str, path: Path, *, task: str | None = None, size: int | None = None) -> nn.Module:
    """The model a weights file of ours holds, rebuilt from its record and loaded strictly, in eval mode:
    a `TaskModel` for a fine-tuned model ("task-model"), the bare encoder for an encoder export
    ("<method>-encoder"). With `task`, only a fine-tuned model with that task's head is accepted.
    Anything else is a one-line `CheckpointError` naming the file. A model recorded as trained at another
    image side than `size` is analysed all the same, with a warning."""
    try:
        tensors, meta = load_weights(path)
    except CheckpointError as exc:
        raise CheckpointError(f"--model {name}: {exc}; give a weights file fedretina wrote") from None
    kind = str(meta.get("kind", ""))
    if not kind:
        raise CheckpointError(
            f"--model {name}: {path} records no fedretina metadata; give a model fedretina wrote "
            "(a fine-tuned model's .safetensors or an encoder export)"
        )
    tasks = meta.get("tasks") or {}
    if task is not None and (kind != "task-model" or task not in tasks):
        held = f"a task-model with heads {sorted(tasks)}" if kind == "task-model" else f"{kind!r} weights"
        raise CheckpointError(
            f"--model {name}: {path} holds {held}; this analysis needs a fine-tuned model with a "
            f"{task!r} head (e.g. runs/NAME/finetune/checkpoints/*.safetensors or a federation's "
            "model.safetensors)"
        )
    if kind != "task-model" and not kind.endswith("-encoder"):
        raise CheckpointError(
            f"--model {name}: {path} holds {kind!r} weights; give a fine-tuned model (task-model) or an "
            "encoder export"
        )
    trained = _trained_size(meta, kind)
    if size is not None and trained is not None and trained != size:
        log.warning("%s: %s was trained at %d px; it is analysed at %d px", name, path, trained, size)
    encoder = build_encoder(_model_config(path, meta))
    model = TaskModel(encoder, {t: int(k) for t, k in tasks.items()}) if kind == "task-model" else encoder
    load_into(model, tensors, path, strict=True)
    return model.eval()


def load_models(
    specs: Sequence[str], device: torch.device, *, task: str | None = None, size: int | None = None
) -> dict[str, nn.Module]:
    """Every `NAME=PATH` model, checked before any data work, on `device`."""
    return {
        name: load_model(name, path, task=task, size=size).to(device)
        for name, path in parse_models(specs).items()
    }


def _trained_size(meta: dict, kind: str) -> int | None:
    """The image side a model was trained at, from its recorded settings (None when not recorded)."""
    settings = meta.get("settings") or {}
    pretraining = settings.get("data.image_size")
    size = pretraining if kind != "task-model" else settings.get("data.finetune_image_size") or pretraining
    return int(size) if size else None


def _model_config(path: Path, meta: dict) -> ModelConfig:
    try:
        return ModelConfig(arch=meta["arch"], width_mult=meta["width_mult"], norm=meta["norm"])
    except (KeyError, ValidationError):
        fields = {k: meta.get(k) for k in ("arch", "width_mult", "norm")}
        raise CheckpointError(f"{path}: its record does not describe a model we build: {fields}") from None
