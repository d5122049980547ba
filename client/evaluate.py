"""A site scores a model file on its own held-out test patients: the consortium's result, read where the
images are. Nothing is written and nothing leaves the site; the model says how to build itself (its
record's settings and tasks).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from shared.data.site import Site
from shared.device import configure_torch
from shared.errors import CheckpointError, DataError
from shared.federation.wire import MAX_CLASSES, MAX_TASKS
from shared.metrics import bootstrap_ci, evaluate_predictions
from shared.names import TASK_NAME
from shared.training.finetune import build_task_model, predict_rows, site_test_rows
from shared.weights import config_of, load_into, load_weights

SHOWN = ("accuracy", "auc", "kappa", "f1_weighted")


@dataclass(frozen=True)
class TestScore:
    """One task's scores on the site's test images, with the bootstrap 95% interval of its headline AUC
    (referable-DR AUC for DR, the task's AUC otherwise)."""

    task: str
    images: int
    patients: int
    metrics: dict[str, float]
    headline: str
    interval: tuple[float, float]


def evaluate_model(site: Site, path: Path, resamples: int = 1000) -> list[TestScore]:
    """Every task of the model at `path` (a run's `model.safetensors`) that this site holds test images of."""
    tensors, meta = load_weights(path)
    tasks = _tasks(path, meta)
    cfg = config_of(path, meta)
    model = build_task_model(cfg, tasks)
    load_into(model, tensors, path)
    device = configure_torch(cfg)
    model.to(device)
    threshold = cfg.finetune.referable_threshold
    scores = []
    for task in tasks:
        rows = site_test_rows(site, task)
        if not len(rows):
            continue
        y, p = predict_rows(model, site, cfg, task, rows, device)
        headline = "referable_auc" if task == "dr" else "auc"

        metric = partial(_one_metric, task=task, key=headline, threshold=threshold)
        metrics = evaluate_predictions(y, p, task, referable_threshold=threshold)
        interval = bootstrap_ci(y, p, metric, rounds=resamples, seed=cfg.seed)
        scores.append(TestScore(task, len(rows), rows["patient_id"].nunique(), metrics, headline, interval))
    if not scores:
        raise DataError(
            f"site {site.name} holds no test images of the model's tasks ({', '.join(tasks)}): only images "
            "in its test split are scored (split: test in its manifest)"
        )
    return scores


def _tasks(path: Path, meta: dict) -> dict[str, int]:
    """The model's tasks and their class counts, as its record names them (checked: the file is input)."""
    tasks = meta.get("tasks")
    fine = meta.get("kind") == "task-model" and isinstance(tasks, dict) and 0 < len(tasks) <= MAX_TASKS
    if not fine:
        raise CheckpointError(
            f"{path}: holds {meta.get('kind')!r} weights, not a fine-tuned model; give a run's "
            "federation/model.safetensors"
        )
    for task, classes in tasks.items():
        if (
            not TASK_NAME.fullmatch(str(task))
            or not isinstance(classes, int)
            or not 2 <= classes <= MAX_CLASSES
        ):
            raise CheckpointError(
                f"{path}: its record's task {task!r} with {classes!r} classes is not one we write"
            )
    return tasks


def _one_metric(y: np.ndarray, p: np.ndarray, *, task: str, key: str, threshold: int) -> float:
    return evaluate_predictions(y, p, task, referable_threshold=threshold)[key]


def table(site: Site, path: Path, scores: list[TestScore]) -> str:
    """The scores as a Markdown table, the headline AUC with its interval first."""
    lines = [
        f"{path} on site {site.name}'s test patients (never trained on):",
        "",
        "| task | test images (patients) | headline AUC | 95% CI | " + " | ".join(SHOWN) + " |",
        "|---" * (4 + len(SHOWN)) + "|",
    ]
    for s in scores:
        low, high = s.interval
        values = " | ".join(f"{s.metrics[k]:.3f}" for k in SHOWN)
        lines.append(
            f"| {s.task} | {s.images} ({s.patients}) | {s.headline} {s.metrics[s.headline]:.3f} | "
            f"[{low:.3f}, {high:.3f}] | {values} |"
        )
    return "\n".join(lines)
