"""`fedretina study pretraining` end to end at the tiny profile: every arm of every seed, paired subsets,
the paired differences with their intervals, the probe curve, and a resume that trains nothing again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from shared.config import ExperimentConfig, load_config
from shared.data.site import load_site
from shared.training.finetune import site_test_rows
from shared.weights import load_weights
from simulation.studies.pretraining import run_pretraining_study
from tests.conftest import write_site


def study_config(
    eyepacs40: Path, tmp_path: Path, tiny_sites: dict[str, Path], name: str, **overrides: object
) -> ExperimentConfig:
    """A tiny study: the 40-image labelled site, SparK on the tiny UKB-like site, two fine-tuning seeds."""
    base = {
        "sites": [str(eyepacs40)],
        "runs_dir": str(tmp_path / "runs"),
        "name": name,
        "finetune.bootstrap": 20,
        "study.pretrain_sites": [str(tiny_sites["ukb"])],
        "study.seeds": [0, 1],
    }
    return load_config(profile="tiny", overrides=base | overrides)


def test_study_pairs_arms_and_reports_differences_with_intervals(
    eyepacs40: Path, tmp_path: Path, tiny_sites: dict[str, Path]
) -> None:
    cfg = study_config(
        eyepacs40,
        tmp_path,
        tiny_sites,
        name="study",
        **{"pretrain.epochs": 2, "finetune.steps": 4, "study.label_counts": [10, 0], "study.probe_every": 1},
    )
    out = run_pretraining_study(cfg).directory
    arms = pd.read_csv(out / "arms.csv", dtype={"labels": str})
    test = arms[arms["split"] == "test"]
    assert len(test) == 2 * 2 * 2  # seeds x counts x inits
    small = test[test["labels"] == "10img"]
    assert (small["train_images"] + small["val_images"] <= 10).all()
    # paired: within a seed and count, both inits trained on the very same images
    assert (small.groupby(["seed"])["train_images"].nunique() == 1).all()
    diff = pd.read_csv(out / "differences.csv", dtype={"labels": str})
    assert list(diff["labels"]) == ["10img", "1.0"] and set(diff["init"]) == {"spark"}
    assert (diff["referable_auc_low"] <= diff["referable_auc_high"]).all()
    probe = pd.read_csv(out / "probe.csv")
    assert list(probe["epoch"]) == [0, 1, 2]  # the random encoder, then every snapshot
    assert np.isfinite(probe["auc"]).all()
    table = (out / "table.md").read_text()
    assert table.count("| spark |") == 2 and table.count("| spark − scratch |") == 2  # means, differences
    stamp = (out / "arms.csv").stat().st_mtime_ns
    run_pretraining_study(cfg, resume=True)  # nothing left to train: arms.csv is rewritten unchanged
    assert pd.read_csv(out / "arms.csv", dtype={"labels": str}).equals(arms)
    assert stamp <= (out / "arms.csv").stat().st_mtime_ns
    fewer = cfg.model_copy(update={"study": cfg.study.model_copy(update={"label_counts": (10,)})})
    table = run_pretraining_study(fewer, resume=True).table  # a resume asking for fewer label counts
    assert table.count("| spark |") == 1 and "| all |" not in table


def test_pretraining_seeds_pool_into_one_difference_scored_on_held_out_patients_too(
    eyepacs40: Path, tmp_path: Path, tiny_sites: dict[str, Path]
) -> None:
    """`study.pretrain_seeds`: one SparK per seed, each its own init; the pooled row is the mean of theirs,
    its interval redrawn over the seeds too. `study.test_sites`: every arm scores their test images beside
    the site's own."""
    rendered = write_site(tmp_path / "held", "eyepacs", 12, seed=5, test_fraction=1.0, first_id=100_000)
    held_out = tmp_path / "held-out.yaml"
    held_out.write_text(
        yaml.safe_dump(
            yaml.safe_load(rendered.read_text()) | {"name": "held-out", "options": {"labels": None}}
        )
    )
    cfg = study_config(
        eyepacs40,
        tmp_path,
        tiny_sites,
        name="seeds",
        **{
            "pretrain.epochs": 1,
            "finetune.steps": 2,
            "study.pretrain_seeds": [0, 1],
            "study.test_sites": [str(held_out)],
            "study.label_counts": [10],
        },
    )
    out = run_pretraining_study(cfg).directory
    encoders = [tmp_path / f"runs/seeds/spark-seed{k}/pretrain/encoder.safetensors" for k in (0, 1)]
    first, second = (load_weights(e)[0] for e in encoders)
    assert any(not first[k].equal(second[k]) for k in first)  # two pretrainings, not one twice
    with np.load(out / "seed0/predictions/test/spark-seed1_10img_fold0.npz") as saved:
        scored = saved["y_true"]
    own, more = (len(site_test_rows(load_site(p), "dr")) for p in (eyepacs40, held_out))
    assert more > 0 and len(scored) == own + more  # the held-out site's test images beside the site's own
    diff = pd.read_csv(out / "differences.csv", dtype={"labels": str}).set_index("init")
    assert set(diff.index) == {"spark-seed0", "spark-seed1", "spark (2 pretraining seeds)"}
    pooled = diff.loc["spark (2 pretraining seeds)"]
    for key in ("referable_auc", "kappa"):  # the mean over the 2 x 2 grid is the mean of the two rows
        assert pooled[key] == pytest.approx(diff.loc[["spark-seed0", "spark-seed1"], key].mean())
    assert pooled["pretrain_seeds"] == 2 and pooled["referable_auc_low"] <= pooled["referable_auc_high"]
    assert f"{own + more} test images; a pooled row's interval also redraws" in (out / "table.md").read_text()


@pytest.mark.integration
def test_a_federated_arm_over_one_site_is_the_centralised_encoder_bit_for_bit(
    eyepacs40: Path, tmp_path: Path, tiny_sites: dict[str, Path]
) -> None:
    """`study.federated`: SparK by a real `flwr run .` over the unlabelled sites, paired with the centralised
    SparK of its seed. One site holding every image, a local epoch a round: the federation is the pooled run,
    so the two encoders are equal bit for bit and the difference and both ends of its interval are 0."""
    cfg = study_config(
        eyepacs40,
        tmp_path,
        tiny_sites,
        name="fed",
        threads=1,  # the simulation's actors train on one thread: the same floats need the same sums
        **{
            "pretrain.epochs": 1,
            "finetune.steps": 2,
            "federation.min_sites": 1,
            "study.seeds": [0],  # one fine-tuning seed: the property is the encoders' equality
            "study.label_counts": [10],
            "study.federated": {"fedavg": {"federation.strategy": "fedavg"}},
        },
    )
    out = run_pretraining_study(cfg).directory
    central, _ = load_weights(tmp_path / "runs/fed/pretrain/encoder.safetensors")
    federated, _ = load_weights(tmp_path / "runs/fed/fedavg/federation/encoder.safetensors")
    assert central.keys() == federated.keys()
    assert all(torch.equal(central[k], federated[k]) for k in central)
    diff = pd.read_csv(out / "differences.csv", dtype={"labels": str}).set_index(["init", "versus"])
    versus = diff.loc[("fedavg", "spark")]
    assert (versus[["referable_auc", "referable_auc_low", "referable_auc_high", "kappa"]] == 0).all()
    images = len(load_site(tiny_sites["ukb"]).rows)
    table = (out / "table.md").read_text()
    arm = f"fedavg: fedavg, 1 round of 1 local epoch, {images:,} sample-gradients (centralised {images:,})"
    assert arm in table
