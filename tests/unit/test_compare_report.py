"""`fedretina compare`'s settings and statistics that need no training: what it refuses, the verdict
against the margin, the interval over seeds and the paired interval of identical predictions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from server.store import RunStore
from shared.config import load_config
from shared.data.scenario import load_scenario, scenario_sites
from shared.errors import CheckpointError, ConfigError
from shared.federation.wire import FINETUNE
from shared.metrics import paired_difference_ci
from shared.training.checkpoint import export_encoder
from shared.training.finetune import finetune_split
from shared.training.initialisation import read_encoder_export
from shared.weights import save_weights, weights_meta
from simulation.compare.arms import ARM_JSON, FEDERATED, CompareArm, _store_record, plan_arms, run_compare_arm
from simulation.compare.report import INCONCLUSIVE, INFERIOR, NON_INFERIOR, mean_ci, verdict
from simulation.studies.paired import Predictions, study_metrics


def test_a_scenario_naming_an_undefined_strategy_is_refused_in_one_line() -> None:
    with pytest.raises(
        ConfigError, match=r"compare.*scenarios.iid-4: strategies \['fedprox'\] are not defined"
    ):
        load_config(profile="tiny", overrides={"compare.scenarios": {"iid-4": ["fedprox"]}})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"finetune.task": "mmac"}, "finetune.task: compare grades DR"),
        ({"federation.local_steps": 5}, "federation.local_steps: compare matches compute itself"),
        (
            {"compare.strategies": {"fedavg": {"federation.local_steps_finetune": 2}}},
            r"compare.strategies.fedavg: federation.local_steps_finetune is derived from the rounds;",
        ),
        ({"compare.pretrain": True, "compare.encoder": "x.safetensors"}, "compare.encoder: a given encoder"),
    ],
)
def test_settings_compare_cannot_honour_are_refused_before_training(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_arms(load_config(profile="tiny", overrides=overrides))


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (-0.015, 0.01, NON_INFERIOR),  # the whole interval above -margin
        (-0.03, 0.01, INCONCLUSIVE),  # it straddles -margin
        (-0.08, -0.03, INFERIOR),  # wholly below
        (math.nan, math.nan, INCONCLUSIVE),
    ],
)
def test_the_verdict_reads_the_interval_against_the_margin(low: float, high: float, expected: str) -> None:
    assert verdict(low, high, 0.02) == expected


def test_the_interval_over_seeds_is_students_t_and_absent_for_one_seed() -> None:
    mean, low, high = mean_ci(pd.Series([0.80, 0.82, 0.84]))
    assert mean == pytest.approx(0.82) and mean - low == pytest.approx(high - mean)
    assert high - mean == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-5)  # t(0.975, 2)
    assert mean_ci(pd.Series([0.90, 0.99, 0.999]), (0.0, 1.0))[2] == 1.0  # an AUC's interval stops at 1
    one = mean_ci(pd.Series([0.9]))
    assert one[0] == 0.9 and math.isnan(one[1]) and math.isnan(one[2])


def test_identical_predictions_pair_to_zero_with_an_interval_of_zero_width() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    logits = rng.normal(size=(200, 5)) + np.eye(5)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    runs = [Predictions(y, probs, logits)] * 2
    metrics = study_metrics(load_config(profile="tiny"))
    for name, metric in metrics.items():
        point, low, high = paired_difference_ci(y, runs, runs, metric, rounds=200, seed=1)
        assert point == low == high == 0.0, name
    other = [Predictions(y, np.roll(probs, 1, axis=0), logits)] * 2
    point, low, high = paired_difference_ci(y, runs, other, metrics["referable_auc"], rounds=200, seed=1)
    assert low <= point <= high and low < high < 0  # predictions shuffled off their images: worse, surely


def test_an_arms_folder_is_named_by_its_settings_wherever_the_scenario_is_named_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "eyepacs.yaml").write_text("name: eyepacs\nformat: eyepacs\nroot: data\n")
    scenario = tmp_path / "iid2.yaml"
    scenario.write_text(
        yaml.safe_dump({"name": "iid2", "split": {"kind": "iid", "source": "eyepacs.yaml", "parts": 2}})
    )
    strategies = {
        "a": {"federation.strategy": "fedavg"},
        "same-as-a": {"federation.strategy": "fedavg"},
        "fedbn": {"federation.strategy": "fedbn"},
    }

    def folders(scenario_key: str) -> dict[tuple[str, int], Path]:
        overrides = {
            "runs_dir": str(tmp_path / "runs"),
            "compare.local": False,
            "compare.seeds": [0, 1],
            "compare.strategies": strategies,
            "compare.scenarios": {scenario_key: []},
        }
        return {
            (a.label, a.seed): a.folder for a in plan_arms(load_config(profile="tiny", overrides=overrides))
        }

    absolute = folders(str(scenario))
    assert absolute[("a", 0)] == absolute[("same-as-a", 0)]  # identical settings: one arm, trained once
    assert (
        len({absolute[("a", 0)], absolute[("fedbn", 0)], absolute[("a", 1)], absolute[("centralised", 0)]})
        == 4
    )
    monkeypatch.chdir(tmp_path)
    assert folders("iid2.yaml") == absolute  # the same data named from another folder


def test_a_strategy_of_other_rounds_takes_the_local_steps_that_keep_the_centralised_compute(
    tiny_sites: dict[str, Path], tmp_path: Path
) -> None:
    """Four times the fine-tuning rounds: each site takes the local steps that make the rounds' batches the
    centralised epochs over the pooled images (to the nearest step); other rounds of pretraining leave
    fine-tuning's rounds an epoch long; pretraining rounds without compared pretraining are refused."""
    scenario = tmp_path / "iid2.yaml"
    split = {"kind": "iid", "source": str(tiny_sites["eyepacs"]), "parts": 2}
    scenario.write_text(yaml.safe_dump({"name": "iid2", "split": split}))
    strategies = {
        "short": {"federation.rounds_finetune": 16, "finetune.batch_size": 2},
        "pre": {"federation.rounds_pretrain": 4, "pretrain.batch_size": 2},
    }

    def federated(**overrides: object) -> dict[str, CompareArm]:
        settings = {
            "runs_dir": str(tmp_path / "runs"),
            "compare.local": False,
            "federation.rounds_finetune": 8,
            "compare.strategies": strategies,
            "compare.scenarios": {str(scenario): list(overrides.pop("names"))},  # type: ignore[call-overload]
        }
        arms = plan_arms(load_config(profile="tiny", overrides=settings | overrides))
        return {a.label: a for a in arms}

    arms = federated(names=["short"])
    short, centralised = arms["short"].cfg, arms["centralised"].cfg
    sites = scenario_sites(load_scenario(str(scenario)), arms["short"].seed)
    images = [len(finetune_split(s.rows, "dr", short)[0]) for s in sites]
    batches = 16 * len(sites) * short.finetune.batch_size  # 16 rounds of every site's batch
    steps = short.federation.local_steps_finetune
    assert steps > 1 and abs(steps * batches - centralised.finetune.epochs * sum(images)) <= batches / 2
    assert short.federation.local_steps == 0 and centralised.federation.steps_in(FINETUNE) == 0

    pre = federated(names=["pre"], **{"compare.pretrain": True, "federation.rounds_pretrain": 2})["pre"].cfg
    pooled = sum(len(s.rows) for s in sites)
    batches = 4 * len(sites) * pre.pretrain.batch_size
    assert abs(pre.federation.local_steps * batches - 2 * pooled) <= batches / 2
    assert pre.federation.steps_in(FINETUNE) == 0  # fine-tuning keeps its epoch-long rounds
    with pytest.raises(
        ConfigError, match=r"compare\.strategies\.pre: federation\.rounds_pretrain: compare\.pretrain is off"
    ):
        federated(names=["pre"])


def test_a_reused_arm_is_reported_under_this_comparisons_names(tmp_path: Path) -> None:
    """The cost table and the curves group records by label and scenario: an arm trained by a comparison
    that named it otherwise must still land in this comparison's rows."""
    cfg = load_config(profile="tiny", overrides={"runs_dir": str(tmp_path), "name": "federated-0123456789ab"})
    arm = CompareArm(FEDERATED, "fedavg-small-batch", "iid-4", 3, cfg)
    arm.folder.mkdir(parents=True)
    trained = {
        "kind": FEDERATED,
        "label": "site-batch-8",
        "scenario": "/old/iid-4.yaml",
        "seed": 3,
        "wall_s": 7.0,
    }
    (arm.folder / ARM_JSON).write_text(json.dumps(trained))
    record = run_compare_arm(arm)
    assert (record["label"], record["scenario"], record["seed"], record["wall_s"]) == (
        "fedavg-small-batch",
        "iid-4",
        3,
        7.0,
    )


def test_an_encoder_export_is_read_with_its_kind_and_anything_else_is_refused(tmp_path: Path) -> None:
    cfg = load_config(profile="tiny", overrides={"pretrain.method": "moco"})
    state = {"w": torch.zeros(2)}
    export_encoder(tmp_path / "moco.safetensors", state, cfg)
    tensors, kind = read_encoder_export(tmp_path / "moco.safetensors", cfg.model)
    assert kind == "moco" and torch.equal(tensors["w"], state["w"])
    save_weights(tmp_path / "model.safetensors", state, weights_meta(cfg, "task-model"))
    with pytest.raises(CheckpointError, match="not a SparK, MoCo or MAE encoder export"):
        read_encoder_export(tmp_path / "model.safetensors", cfg.model)
    wider = cfg.model.model_copy(update={"width_mult": 1.0})
    with pytest.raises(CheckpointError):
        read_encoder_export(tmp_path / "moco.safetensors", wider)


def test_a_federated_curve_is_drawn_at_the_passes_its_rounds_paid_for(tmp_path: Path) -> None:
    """82 short rounds of 16 epochs' compute: round r sits at r x 16/82 passes, the last at 16, so the curve
    lies on the centralised one's axis."""
    store = RunStore(tmp_path / "store.sqlite", "arm")
    for rnd in (1, 41, 82):
        store.add_metrics(FINETUNE, rnd, "federated-eval", {"dr-referable_auc": rnd / 100})
    curve = _store_record(tmp_path / "store.sqlite", 16 / 82)["curve"]
    assert [p["epochs"] for p in curve] == pytest.approx([16 / 82, 8.0, 16.0])
    assert [p["referable_auc"] for p in curve] == pytest.approx([0.01, 0.41, 0.82])
