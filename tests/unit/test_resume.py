"""Resume refuses what would mix two runs: a federated checkpoint continued with a changed setting that
shapes the result (rounds included) or another scenario, and a centralised one likewise, each in one line
naming the key; operational settings (timeouts, workers) may change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.checkpoints import Checkpoints, Saved
from server.run import CHECKPOINT, check_resumable, rounds_done
from server.store import RunStore, StoreError
from shared.config import RunOptions, load_config
from shared.errors import CheckpointError
from shared.federation.strategies import ServerMoments
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


def test_a_checkpoint_keeps_the_moments_a_cyclic_chain_or_fedadam_carries_into_the_next_round(
    tmp_path: Path,
) -> None:
    store = Checkpoints(tmp_path / "checkpoints")
    arrays = {"encoder.w": np.zeros((2, 2), np.float32)}
    carried = {"encoder.w/exp_avg": np.full((2, 2), 0.5, np.float32), "encoder.w/step": np.array(7.0)}
    store.save("finetune", 2, arrays, None, {}, carried)
    saved = store.load("finetune", 2)
    assert saved.carried.keys() == carried.keys() and saved.arrays.keys() == arrays.keys()
    assert all(np.array_equal(saved.carried[k], v) for k, v in carried.items())
    store.save("finetune", 3, arrays, None, {})
    assert store.load("finetune", 3).carried == {}  # nothing carried: nothing kept
    m, v = {"encoder.w": np.full((2, 2), 0.1, np.float32)}, {"encoder.w": np.full((2, 2), 0.2, np.float32)}
    store.save("finetune", 4, arrays, ServerMoments(m, v, 4), {})  # FedAdam's moments beside the weights
    adam = store.load("finetune", 4).adam
    assert adam is not None and adam.step == 4
    assert np.array_equal(adam.m["encoder.w"], m["encoder.w"]) and np.array_equal(
        adam.v["encoder.w"], v["encoder.w"]
    )


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


def test_a_federated_resume_ignores_the_settings_only_centralised_commands_read(tmp_path: Path) -> None:
    path, meta = saved_checkpoint(tmp_path)
    centralised_only = {"finetune.folds": 3, "pretrain.epochs": 50, "finetune.protocol": "holdout"}
    check_resumable(path, meta, load_config(profile="tiny", overrides=centralised_only), OPTIONS)
    # federated sites split their images by it in phase 2
    with pytest.raises(CheckpointError, match=r"finetune\.val_fraction=0\.2 \(now 0\.3\)"):
        check_resumable(
            path, meta, load_config(profile="tiny", overrides={"finetune.val_fraction": 0.3}), OPTIONS
        )


@pytest.mark.parametrize(
    ("saved", "phase", "done"),
    [
        (None, "pretrain", 0),  # a fresh run
        (("pretrain", 2), "pretrain", 2),  # killed in phase 1: continue after round 2
        (("pretrain", 2), "finetune", 0),  # ... phase 2 has not begun
        (("finetune", 1), "pretrain", 3),  # killed in phase 2: phase 1 is complete
        (("finetune", 1), "finetune", 1),
    ],
)
def test_a_resumed_run_knows_how_many_rounds_of_each_phase_are_done(saved, phase: str, done: int) -> None:
    checkpoint = Saved(saved[0], saved[1], {}, None, {}, {}) if saved else None
    assert rounds_done(checkpoint, phase, total=3) == done


def test_a_run_store_of_another_schema_is_refused_in_one_line(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "store.sqlite"
    RunStore(path, "r").event("start", "first")
    RunStore(path, "r").event("start", "again")  # this version reopens its own stores
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with pytest.raises(
        StoreError, match=r"store.sqlite: a run store of another fedretina version \(schema 1"
    ):
        RunStore(path, "r")
