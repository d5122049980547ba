"""The linear probe: a frozen encoder's globally pooled features, read out by a logistic regression.

A second, cheaper read-out than fine-tuning: nothing in the encoder moves, so the score measures what the
encoder alone holds (`fedretina probe` for one export; the pretraining study's curve over its snapshots).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import Dataset

from shared.config import ExperimentConfig
from shared.data.dataset import loader
from shared.data.manifest import labelled, task_classes
from shared.data.site import Site
from shared.device import configure_torch
from shared.errors import CheckpointError, ConfigError, DataError
from shared.metrics import evaluate_predictions
from shared.models import build_encoder
from shared.rundir import atomic_write_text, start_run_dir
from shared.seeding import derive_seed, seed_everything
from shared.training.data import load_sites, pooled, site_images
from shared.training.finetune import finetune_split, site_test_rows
from shared.training.initialisation import FINETUNE_SEED, check_init, initialise
from shared.weights import load_weights

PART = "probe"  # runs/NAME/probe/
# `initialise` kinds whose files are our encoder exports (`<kind>-encoder`)
EXPORT_KINDS = ("spark", "moco", "natural")
log = logging.getLogger(__name__)


@torch.no_grad()
def pooled_features(
    encoder: nn.Module, data: Dataset, device: torch.device, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, C) float64: the mean of the last feature map, as the task heads pool it; labels (N,)),
    in dataset order, eval mode: the frozen encoder's view, nothing (BatchNorm statistics too) updated."""
    encoder.eval()
    feats, labels = [], []
    for batch in loader(data, batch_size, seed=None, train=False):
        last = encoder.forward_features(batch["image"].to(device))[-1]
        feats.append(last.double().mean(dim=(2, 3)).cpu())
        labels.append(batch["label"])
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def fit_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    task: str,
    num_classes: int,
    *,
    seed: int = 0,
    referable_threshold: int = 2,
    c: float = 1.0,
) -> dict[str, float]:
    """The test metrics of a logistic regression (multinomial, lbfgs) on features standardised with the
    training rows' statistics. Classes absent from training get probability 0, so the metrics see all
    `num_classes` columns, as a fine-tuned head's would."""
    present = np.unique(y_train)
    if len(present) < 2:
        raise DataError(
            f"linear probe: the training images hold only {task} class {present.tolist()}; "
            "it needs images of two classes or more"
        )
    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(C=c, max_iter=2000, random_state=seed % 2**32)
    model.fit(scaler.transform(x_train), y_train)
    probs = np.zeros((len(x_test), num_classes))
    probs[:, model.classes_] = model.predict_proba(scaler.transform(x_test))
    return evaluate_predictions(y_test, probs, task, referable_threshold=referable_threshold)


def export_kind(weights: Path) -> str:
    """The `initialise` kind of an encoder export ('spark' or 'moco'), read from the file's own record;
    a missing file, or weights that are no encoder export, are one-line `CheckpointError`s."""
    _, meta = load_weights(weights)
    kind = str(meta.get("kind", ""))
    method = kind.removesuffix("-encoder")
    if method == kind or method not in EXPORT_KINDS:
        wanted = " or ".join(f"{k}-encoder" for k in EXPORT_KINDS)
        raise CheckpointError(
            f"{weights}: holds {kind or 'unrecorded'!r} weights, not an encoder export ({wanted})"
        )
    return method


def probe_encoder(
    cfg: ExperimentConfig, weights: Path | None, train: Dataset, test: Dataset, task: str, num_classes: int
) -> dict[str, float]:
    """Probe an encoder export, or (weights None) the seeded random encoder the hold-out protocol's and
    federated phase 2's scratch models start from: the reference a pretrained encoder has to beat."""
    device = configure_torch(cfg)
    seed_everything(derive_seed(cfg.seed, FINETUNE_SEED))
    encoder = build_encoder(cfg.model)
    if weights is not None:
        initialise(encoder, export_kind(weights), str(weights), cfg.model)
    encoder.to(device)
    x_train, y_train = pooled_features(encoder, train, device)
    x_test, y_test = pooled_features(encoder, test, device)
    return fit_probe(
        x_train,
        y_train,
        x_test,
        y_test,
        task,
        num_classes,
        seed=cfg.seed,
        referable_threshold=cfg.finetune.referable_threshold,
    )


def run_probe(cfg: ExperimentConfig, encoder: Path | None) -> dict:
    """`fedretina probe`: fit on every labelled site's fine-tuning training rows (`finetune_split`), score
    on the sites' own test splits; writes runs/NAME/probe/probe.json and returns its record."""
    task = cfg.finetune.task
    if encoder is not None:  # before any data work
        check_init(export_kind(encoder), str(encoder), cfg.model)
    sites = [s for s in load_sites(cfg.sites) if len(labelled(s.rows, task))]
    if not sites:
        raise ConfigError(f"finetune.task: no configured site holds labels for task {task!r}")
    train = {s.name: finetune_split(s.rows, task, cfg)[0] for s in sites}
    test = {s.name: site_test_rows(s, task) for s in sites}
    counts = {"train_images": _count(train), "test_images": _count(test)}
    if not counts["test_images"]:
        raise ConfigError(
            f"probe: no configured site holding {task!r} labels has a labelled test split; add one with "
            "--site (e.g. an EyePACS-layout site, whose test/ images are graded)"
        )
    if not counts["train_images"]:
        raise DataError(f"probe: the configured sites hold {task!r} labels on test images only")
    num_classes = task_classes(pd.concat([labelled(s.rows, task) for s in sites]))[task]
    out = start_run_dir(cfg, PART)
    log.info("probe of %s on %s: %s", encoder or "a random encoder", task, counts)
    metrics = probe_encoder(
        cfg, encoder, _images(cfg, sites, train), _images(cfg, sites, test), task, num_classes
    )
    record = {
        "task": task,
        "encoder": None if encoder is None else str(encoder),
        "sites": [s.name for s in sites],
        **counts,
        "metrics": metrics,
    }
    undefined_as_null = {k: None if math.isnan(v) else v for k, v in metrics.items()}
    atomic_write_text(out / "probe.json", json.dumps(record | {"metrics": undefined_as_null}, indent=2))
    return record


def _count(rows: dict[str, pd.DataFrame]) -> int:
    return sum(len(r) for r in rows.values())


def _images(cfg: ExperimentConfig, sites: list[Site], rows: dict[str, pd.DataFrame]) -> Dataset:
    """Each site's `rows` read through that site's cache, unaugmented, as one dataset."""
    size, task = cfg.finetune_image_size, cfg.finetune.task
    return pooled(
        [site_images(s, cfg, size, "none", rows=rows[s.name], task=task) for s in sites if len(rows[s.name])]
    )
