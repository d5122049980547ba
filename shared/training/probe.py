"""The linear probe: a frozen encoder's globally pooled features, read out by a logistic regression.

A second, cheaper read-out than fine-tuning: nothing in the encoder moves, so the score measures what
pretraining put into the features alone (the study's probe curve over pretraining epochs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import Dataset

from shared.config import ExperimentConfig
from shared.data.dataset import loader
from shared.device import configure_torch
from shared.metrics import evaluate_predictions
from shared.training.initialisation import finetuning_start, initialise


@torch.no_grad()
def pooled_features(
    encoder: nn.Module, data: Dataset, device: torch.device, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, C) float64: the mean of the last feature map, as the task heads pool it; labels (N,)),
    in dataset order, eval mode."""
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
    referable_threshold: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """Standardised multinomial logistic regression; the test metrics (absent classes get probability 0)."""
    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(max_iter=2000, random_state=seed).fit(scaler.transform(x_train), y_train)
    probs = np.zeros((len(x_test), num_classes))
    probs[:, model.classes_] = model.predict_proba(scaler.transform(x_test))
    return evaluate_predictions(y_test, probs, task, referable_threshold=referable_threshold)


def probe_encoder(
    cfg: ExperimentConfig, weights: Path | None, train: Dataset, test: Dataset, task: str, num_classes: int
) -> dict[str, float]:
    """Probe an encoder export (None: the seeded random encoder fine-tuning's scratch arm starts from)."""
    device = configure_torch(cfg)
    model = finetuning_start(cfg, {task: num_classes}, "probe")
    if weights is not None:
        initialise(model.encoder, "spark", str(weights), cfg.model)
    encoder = model.encoder.to(device)
    x_train, y_train = pooled_features(encoder, train, device)
    x_test, y_test = pooled_features(encoder, test, device)
    return fit_probe(
        x_train,
        y_train,
        x_test,
        y_test,
        task,
        num_classes,
        referable_threshold=cfg.finetune.referable_threshold,
    )
