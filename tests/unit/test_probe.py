"""The linear probe: the logistic read-out separates what is separable and nothing else, keeps every class's
column, the features are a frozen encoder's (deterministic, nothing updated), and `fedretina probe`'s
orchestration runs end to end on a tiny synthetic site."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from shared.config import ExperimentConfig, load_config
from shared.errors import CheckpointError, ConfigError, DataError
from shared.metrics import metric_keys
from shared.models import build_encoder
from shared.training import linear_probe as probe
from shared.training.checkpoint import export_encoder
from shared.training.linear_probe import export_kind, fit_probe, pooled_features, run_probe
from shared.weights import save_weights, weights_meta


def tiny(tmp_path: Path, *sites: Path, **overrides: object) -> ExperimentConfig:
    cfg = load_config(profile="tiny", overrides=overrides)
    return cfg.model_copy(
        update={"sites": tuple(str(s) for s in sites), "runs_dir": str(tmp_path / "runs"), "name": "p"}
    )


def two_clouds(n: int, dims: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels and Gaussian features whose class 1 is moved by `shift` along the first axis."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, dims))
    x[:, 0] += shift * y
    return x, y


def test_probe_separates_separable_features_and_stays_at_chance_on_noise() -> None:
    x, y = two_clouds(400, 8, shift=8.0, seed=0)
    separable = fit_probe(x[:200], y[:200], x[200:], y[200:], "dme", 2)
    assert separable["auc"] > 0.99 and separable["accuracy"] > 0.97
    x, y = two_clouds(800, 8, shift=0.0, seed=1)
    noise = fit_probe(x[:400], y[:400], x[400:], y[400:], "dme", 2)
    assert abs(noise["auc"] - 0.5) < 0.15
    assert set(separable) == set(noise) == set(metric_keys("dme"))


def test_classes_absent_from_training_keep_their_probability_column(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, np.ndarray] = {}
    evaluate = probe.evaluate_predictions

    def capture(y: np.ndarray, probs: np.ndarray, task: str, **kwargs: int) -> dict[str, float]:
        seen["probs"] = probs
        return evaluate(y, probs, task, **kwargs)

    rng = np.random.default_rng(0)
    x_train, y_train = rng.normal(size=(60, 4)), np.arange(60) % 3  # DR grades 0-2 only
    x_test, y_test = rng.normal(size=(20, 4)), np.arange(20) % 5  # the test split holds all five
    monkeypatch.setattr(probe, "evaluate_predictions", capture)
    metrics = fit_probe(x_train, y_train, x_test, y_test, "dr", 5)
    probs = seen["probs"]
    assert probs.shape == (20, 5)
    assert (probs[:, 3:] == 0).all() and np.allclose(probs.sum(axis=1), 1.0)
    assert set(metrics) == set(metric_keys("dr"))


def test_one_training_class_is_a_one_line_data_error() -> None:
    x = np.zeros((10, 3))
    with pytest.raises(DataError, match="two classes"):
        fit_probe(x, np.ones(10, dtype=int), x, np.arange(10) % 2, "dme", 2)


class Noise(Dataset):
    """Random images with labels, as FundusDataset yields them."""

    def __init__(self, n: int, size: int) -> None:
        self.images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": torch.tensor(i % 2)}


def test_pooled_features_are_deterministic_and_leave_the_encoder_untouched(tmp_path: Path) -> None:
    cfg = tiny(tmp_path)
    encoder = build_encoder(cfg.model)  # fresh: in train mode, where a forward would move BatchNorm
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    data = Noise(6, cfg.data.image_size)
    x1, y1 = pooled_features(encoder, data, torch.device("cpu"), batch_size=4)
    x2, y2 = pooled_features(encoder, data, torch.device("cpu"), batch_size=4)
    assert x1.shape == (6, encoder.feature_channels[-1]) and x1.dtype == np.float64
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and y1.tolist() == [0, 1, 0, 1, 0, 1]
    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, running stats, batch counts


def test_export_kind_reads_the_method_and_refuses_other_weights(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, **{"pretrain.method": "moco"})
    state = build_encoder(cfg.model).state_dict()
    export_encoder(tmp_path / "moco.safetensors", state, cfg, epochs=0)
    assert export_kind(tmp_path / "moco.safetensors") == "moco"
    save_weights(tmp_path / "model.safetensors", state, weights_meta(cfg, "task-model"))
    with pytest.raises(CheckpointError, match="not an encoder export"):
        export_kind(tmp_path / "model.safetensors")


def test_a_missing_encoder_fails_before_any_data_work(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such weights file"):
        run_probe(tiny(tmp_path, tmp_path / "no-site.yaml"), tmp_path / "missing.safetensors")


def test_sites_without_a_labelled_test_split_are_one_config_error(
    tmp_path: Path, tiny_sites: dict[str, Path]
) -> None:
    with pytest.raises(ConfigError, match="test split"):  # APTOS's test images carry no labels
        run_probe(tiny(tmp_path, tiny_sites["aptos"]), None)


def test_run_probe_scores_an_exported_encoder_on_the_sites_test_split(
    tmp_path: Path, tiny_sites: dict[str, Path]
) -> None:
    cfg = tiny(tmp_path, tiny_sites["eyepacs"])
    export_encoder(tmp_path / "encoder.safetensors", build_encoder(cfg.model).state_dict(), cfg, epochs=0)
    record = run_probe(cfg, tmp_path / "encoder.safetensors")
    assert tuple(record["metrics"]) == metric_keys("dr")
    assert record["train_images"] > 0 and record["test_images"] > 0
    written = json.loads((tmp_path / "runs" / "p" / "probe" / "probe.json").read_text())
    assert written["encoder"] == str(tmp_path / "encoder.safetensors")
    assert set(written["metrics"]) == set(metric_keys("dr"))
