"""Resume refuses what would mix two runs: a federated checkpoint continued with a changed setting that
shapes the result (rounds included) or another scenario, and a centralised one likewise, each in one line
naming the key; operational settings (timeouts, workers) may change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.checkpoints import Checkpoints
from server.run import CHECKPOINT, check_resumable
from shared.config import RunOptions, load_config
from shared.errors import CheckpointError
from shared.weights import check_settings, weights_meta


def saved_checkpoint(tmp_path: Path) -> tuple[Path, dict]:
    cfg = load_config(profile="tiny")
    store = Checkpoints(tmp_path / "checkpoints")
    arrays = {"encoder.w": np.zeros((2, 2), np.float32)}
    path = store.save(
        "pretrain", 1, arrays, None, weights_meta(cfg, CHECKPOINT, run_uid="u", scenario="natural")
    )
    saved = store.latest()
    assert saved is not None and saved.meta["round"] == 1
    return path, saved.meta


OPTIONS = RunOptions(scenario="natural", run_name="r", resume=True)


def test_a_federated_run_resumes_with_its_own_settings(tmp_path: Path) -> None:
    path, meta = saved_checkpoint(tmp_path)
    check_resumable(path, meta, load_config(profile="tiny"), OPTIONS)
    relaxed = {"federation.reply_timeout_s": 5.0, "data.workers": 2, "federation.min_sites": 3}
    check_resumable(path, meta, load_config(profile="tiny", overrides=relaxed), OPTIONS)


def test_resuming_with_changed_rounds_is_refused_naming_the_key(tmp_path: Path) -> None:
    path, meta = saved_checkpoint(tmp_path)
    cfg = load_config(profile="tiny", overrides={"federation.rounds_pretrain": 9})
    with pytest.raises(CheckpointError) as refused:
        check_resumable(path, meta, cfg, OPTIONS)
    message = str(refused.value)
    assert (
        "\n" not in message
        and "was made with other settings: federation.rounds_pretrain=1 (now 9)" in message
    )
    with pytest.raises(CheckpointError, match=r"scenario='natural' \(wanted 'iid-4'\)"):
        check_resumable(
            path, meta, load_config(profile="tiny"), OPTIONS.model_copy(update={"scenario": "iid-4"})
        )


def test_a_centralised_checkpoint_names_every_changed_setting(tmp_path: Path) -> None:
    cfg = load_config(profile="tiny")
    meta = weights_meta(cfg, "spark-checkpoint", epoch=1)
    changed = load_config(profile="tiny", overrides={"pretrain.epochs": 7, "seed": 3, "threads": 1})
    with pytest.raises(CheckpointError) as refused:
        check_settings(tmp_path / "checkpoint.safetensors", meta, changed)
    assert "pretrain.epochs=" in str(refused.value) and "seed=0 (now 3)" in str(refused.value)
    assert "threads" not in str(refused.value)  # operational: free to change
