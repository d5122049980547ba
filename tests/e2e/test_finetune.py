"""Fine-tuning end to end at the tiny profile: one command compares a SparK-pretrained encoder with scratch
at 10% labels; folds never split a patient; bad initialisations fail in one line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
import yaml

from shared.config import load_config
from shared.data.checks import read_site
from shared.data.site_config import load_site_config
from shared.data.splits import assign_folds
from shared.errors import CheckpointError
from shared.models import nnmobilenet, resnet50
from shared.training.initialisation import initialise
from shared.weights import model_meta, save_weights
from simulation.centralised.pretrain import run_pretraining
from tests.conftest import FEDRETINA, write_site


@pytest.fixture(scope="module")
def eyepacs60(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EyePACS-like site of 60 patients (two eyes each), at the tiny profile's scale."""
    return write_site(
        tmp_path_factory.mktemp("eyepacs60"),
        "eyepacs",
        60,
        seed=7,
        height=96,
        styles=("eyepacs-mixed-a", "eyepacs-mixed-b"),
    )


def test_no_patient_appears_in_two_folds_on_an_eyepacs_like_site(eyepacs60: Path) -> None:
    m = read_site(load_site_config(eyepacs60)).manifest
    labelled = m[m.label_dr.notna()]
    assert (labelled.groupby("patient_id").size() == 2).all()  # both eyes of every patient
    folds = assign_folds(labelled, "label_dr", 5, seed=0)
    assert (pd.Series(folds).groupby(labelled.patient_id.to_numpy()).nunique() == 1).all()


def test_one_command_compares_spark_and_scratch_at_ten_percent_labels(
    eyepacs60: Path, tmp_path: Path, tiny_sites: dict[str, Path]
) -> None:
    runs = tmp_path / "runs"
    cfg = load_config(
        profile="tiny",
        overrides={
            "sites": [str(tiny_sites["ukb"]), str(eyepacs60)],
            "pretrain.epochs": 3,
            "runs_dir": str(runs),
            "name": "spark",
        },
    )
    encoder = run_pretraining(cfg).encoder
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(
        yaml.safe_dump(
            {
                "profile": "tiny",
                "runs_dir": str(runs),
                "sites": [str(eyepacs60)],
                "finetune": {
                    "task": "dr",
                    "label_fractions": [0.1],
                    "folds": 3,
                    "run_folds": 1,
                    "epochs": 2,
                    "bootstrap": 20,
                    "inits": {
                        "scratch": {"kind": "scratch"},
                        "spark": {"kind": "spark", "weights": str(encoder)},
                    },
                },
            }
        )
    )
    result = subprocess.run(
        [FEDRETINA, "-q", "finetune", "-c", str(experiment), "--name", "ft"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "| scratch | 10% | cv |" in result.stdout and "| spark | 10% | cv |" in result.stdout
    out = runs / "ft" / "finetune"
    folds = pd.read_csv(out / "folds.csv")
    assert set(folds.init) == {"scratch", "spark"} and set(folds.split) == {"cv", "test"}
    assert (folds.train_images < 30).all()  # 10% of ~80 development images, by patient
    summary = json.loads((out / "summary.json").read_text())
    assert {(r["init"], r["split"]) for r in summary["results"]} >= {("spark", "cv"), ("scratch", "test")}
    test_folds = folds[folds.split == "test"]
    assert (test_folds.auc_ci_low <= test_folds.auc_ci_high).all()
    for name in (
        "auc_vs_fraction.png",
        "roc_spark_10pct.png",
        "confusion_scratch_10pct.png",
        "checkpoints/spark_10pct_fold0.safetensors",
    ):
        assert (out / name).is_file(), name
    first = (out / "checkpoints" / "spark_10pct_fold0.safetensors").stat().st_mtime_ns
    # Resume with one more fold: fold 0 is kept, and the plots cover both folds' saved CV predictions.
    only_spark = f"finetune.inits={{spark: {{kind: spark, weights: {encoder}}}}}"
    command = [FEDRETINA, "-q", "finetune", "-c", str(experiment), "--name", "ft", "--resume"]
    again = subprocess.run(
        [*command, "--set", "finetune.run_folds=2", "--set", only_spark],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert (out / "checkpoints" / "spark_10pct_fold0.safetensors").stat().st_mtime_ns == first
    folds = pd.read_csv(out / "folds.csv")
    cv = folds[(folds.init == "spark") & (folds.split == "cv")]
    assert sorted(cv.fold) == [0, 1]
    saved = [np.load(out / "predictions" / f"spark_10pct_fold{k}.npz") for k in (0, 1)]
    assert [len(s["y_true"]) for s in saved] == cv.sort_values("fold").images.tolist()


def test_missing_imagenet_file_fails_in_one_line(eyepacs60: Path, tmp_path: Path) -> None:
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(
        yaml.safe_dump(
            {
                "profile": "tiny",
                "runs_dir": str(tmp_path / "runs"),
                "sites": [str(eyepacs60)],
                "finetune": {"inits": {"imagenet": {"kind": "imagenet", "weights": "nowhere/resnet50.pth"}}},
            }
        )
    )
    result = subprocess.run(
        [FEDRETINA, "finetune", "-c", str(experiment)], capture_output=True, text=True, check=False
    )
    assert result.returncode == CheckpointError.exit_code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "resnet50.pth: ImageNet weights file not found" in lines[0]


def test_checkpoint_from_another_architecture_fails_in_one_line(tmp_path: Path) -> None:
    cfg = load_config(profile="tiny")
    resnet_cfg = cfg.model.model_copy(update={"arch": "resnet50"})
    path = tmp_path / "resnet-encoder.safetensors"
    save_weights(path, resnet50().state_dict(), {**model_meta(resnet_cfg), "kind": "spark-encoder"})
    with pytest.raises(CheckpointError) as err:
        initialise(nnmobilenet(0.25), "spark", str(path), cfg.model)
    assert str(err.value).count("\n") == 0 and "arch='resnet50' (wanted 'nnmobilenet')" in str(err.value)
    wrong = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), wrong)
    with pytest.raises(CheckpointError, match=r"tensors have other shapes|keys do not match"):
        initialise(resnet50(), "imagenet", str(wrong), resnet_cfg)


def test_imagenet_weights_in_torchvisions_format_load_strictly(tmp_path: Path) -> None:
    reference = torchvision.models.resnet50()
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(reference.state_dict(), path)  # the format torchvision's hub cache holds
    encoder = resnet50()
    initialise(
        encoder,
        "imagenet",
        str(path),
        load_config(profile="tiny").model.model_copy(update={"arch": "resnet50"}),
    )
    assert torch.equal(encoder.conv1.weight, reference.conv1.weight)
    assert not hasattr(encoder, "fc")


def test_moco_can_start_from_imagenet_weights_the_second_seeds_fourth_setup(tmp_path: Path) -> None:
    from shared.training.initialisation import pretraining_start

    reference = torchvision.models.resnet50()
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(reference.state_dict(), path)
    cfg = load_config(
        profile="tiny",
        overrides={
            "model.arch": "resnet50",
            "pretrain.method": "moco",
            "pretrain.init": {"kind": "imagenet", "weights": str(path)},
        },
    )
    moco = pretraining_start(cfg)
    assert torch.equal(moco.encoder.conv1.weight, reference.conv1.weight)
    assert torch.equal(
        moco.key.encoder.layer4[0].conv1.weight, reference.layer4[0].conv1.weight
    )  # key starts equal


def test_the_holdout_protocol_splits_as_federated_sites_do_and_keeps_the_last_epoch(
    eyepacs60: Path, tmp_path: Path
) -> None:
    from shared.data.site import load_site
    from shared.training.finetune import finetune_split
    from simulation.centralised.finetune import run_finetuning

    overrides = {"sites": [str(eyepacs60)], "runs_dir": str(tmp_path), "finetune.protocol": "holdout"}
    cfg = load_config(profile="tiny", overrides=overrides | {"finetune.early_stopping": 1})
    out = run_finetuning(cfg).directory
    folds = pd.read_csv(out / "folds.csv")
    train, val = finetune_split(load_site(eyepacs60).rows, "dr", cfg)
    assert set(folds.split) == {"val", "test"} and (folds.fold == 0).all()
    assert (
        folds.set_index("split").loc["val", "images"] == len(val) and (folds.train_images == len(train)).all()
    )
    history = pd.read_csv(out / "history" / "scratch_100pct_fold0.csv")
    assert history.epoch.tolist() == [1, 2] and (history.seconds > 0).all()  # no early stop, no selection
    assert (folds.best_epoch == cfg.finetune.epochs).all()
    assert "| scratch | 100% | val | 1 |" in out.joinpath("table.md").read_text()


def test_private_centralised_commands_spend_their_budget_and_say_so(eyepacs60: Path, tmp_path: Path) -> None:
    """`fedretina pretrain` then `finetune` with DP through the CLI: sigma planned to land on the budget,
    epsilon (with its unit) in the ledger, the encoder's metadata and the results table."""
    private = [
        "privacy.enabled=true",
        "model.norm=gn",
        "pretrain.loss_reduction=sample",
        f"runs_dir={tmp_path}",
        "pretrain.epochs=1",  # any plan lands on the budget; one epoch each keeps the test short
        "finetune.epochs=1",
    ]
    sets = [arg for s in private for arg in ("--set", s)]
    run = [FEDRETINA, "-q", "pretrain", "--profile", "tiny", "--site", str(eyepacs60), "--name", "dp", *sets]
    done = subprocess.run(run, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ledger = [json.loads(line) for line in (tmp_path / "dp" / "pretrain" / "privacy-ledger.jsonl").open()]
    assert [e["kind"] for e in ledger] == ["plan", "release"]
    assert 0.95 * 8 < ledger[1]["epsilon"] <= 8.0 and ledger[1]["unit"] == "patient"
    from shared.weights import load_weights

    _, meta = load_weights(tmp_path / "dp" / "pretrain" / "encoder.safetensors")
    assert meta["epsilon"] == ledger[1]["epsilon"] and meta["privacy_unit"] == "patient"
    finetune = [FEDRETINA, "-q", "finetune", "--profile", "tiny", "--site", str(eyepacs60), "--name", "dp"]
    finetune += [*sets, "--set", "finetune.protocol=holdout", "--set", "privacy.target_epsilon=3"]
    done = subprocess.run(finetune, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "dp" / "finetune"
    folds = pd.read_csv(out / "folds.csv")
    assert (folds.epsilon <= 3.0).all() and (folds.epsilon > 2.5).all()
    table = (out / "table.md").read_text()
    assert "| epsilon (patient) |" in table.splitlines()[0] and f"| {folds.epsilon.max():.2f} |" in table
