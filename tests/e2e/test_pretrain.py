"""Centralised SparK pretraining at the tiny profile: the loss falls, the model generalises to public
images, previews and exports are written, and a resumed run equals an uninterrupted one bitwise."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from server.public_probe import probe_batch, probe_spark
from shared.config import load_config
from shared.seeding import derive_seed, seed_everything
from shared.training.pretrain import build_spark
from shared.weights import load_into, load_weights
from simulation.centralised.pretrain import run_pretraining
from tests.conftest import FEDRETINA


def config(tmp_path: Path, sites: list[Path], epochs: int, name: str):
    return load_config(
        profile="tiny",
        overrides={
            "sites": [str(s) for s in sites],
            "pretrain.epochs": epochs,
            "runs_dir": str(tmp_path / "runs"),
            "name": name,
            "data.workers": 0,
        },
    )


def test_tiny_pretraining_learns_fundus_structure(tiny_sites: dict[str, Path], tmp_path: Path) -> None:
    sites = [tiny_sites[f] for f in ("ukb", "eyepacs", "mmac", "aptos")]
    cfg = config(tmp_path, sites, 8, "spark")
    out = run_pretraining(cfg)
    assert out.losses[0] > 0.85  # about 1 at initialisation: targets have unit variance per patch
    assert out.losses[-1] < 0.8 * out.losses[0], out.losses
    assert (out.directory / "previews" / "epoch0008.png").is_file() and (out.directory / "loss.png").is_file()
    # The trained model reconstructs masked patches of PUBLIC images (never seen) better than at init.
    images, fov = probe_batch(cfg.data.image_size)
    seed_everything(derive_seed(cfg.seed, "init"))
    untrained = build_spark(cfg)
    trained = build_spark(cfg)
    tensors, _ = load_weights(out.directory / "checkpoint.safetensors")
    load_into(trained, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, Path("ckpt"))
    before, after = probe_spark(untrained, images, fov, None), probe_spark(trained, images, fov, None)
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_killed_and_resumed_pretraining_equals_an_uninterrupted_run(
    tiny_sites: dict[str, Path], tmp_path: Path, stop: signal.Signals
) -> None:
    """Killed (a crash) or stopped (SIGTERM, as Ctrl-C: it says how to continue), then resumed: the same
    encoder as a run never interrupted."""
    sites = [tiny_sites["ukb"], tiny_sites["mmac"]]
    straight = run_pretraining(config(tmp_path, sites, 4, "straight"))
    args = [
        FEDRETINA,
        "-q",
        "pretrain",
        "--profile",
        "tiny",
        "--name",
        "killed",
        "--set",
        "pretrain.epochs=4",
        "--set",
        f"runs_dir={tmp_path / 'runs'}",
        *(a for s in sites for a in ("--site", str(s))),
    ]
    checkpoint = tmp_path / "runs" / "killed" / "pretrain" / "checkpoint.safetensors"
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoint.exists() and load_weights(checkpoint)[1]["epoch"] >= 2:
            process.send_signal(stop)
            break
        time.sleep(0.05)
    _, err = process.communicate()
    killed_at = load_weights(checkpoint)[1]["epoch"]
    expected = -signal.SIGKILL if stop == signal.SIGKILL else 130
    assert process.returncode == expected and killed_at < 4, "the run was not interrupted"
    if stop == signal.SIGTERM:
        assert err.strip().endswith("pretrain: interrupted; run the same command with --resume to continue")
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    a, _ = load_weights(straight.encoder)
    b, meta = load_weights(tmp_path / "runs" / "killed" / "pretrain" / "encoder.safetensors")
    assert meta["kind"] == "spark-encoder" and meta["epochs"] == 4
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_existing_run_is_not_overwritten_without_resume(
    tiny_sites: dict[str, Path], tmp_path: Path
) -> None:
    import pytest

    from shared.errors import CheckpointError

    cfg = config(tmp_path, [tiny_sites["ukb"]], 1, "once")
    run_pretraining(cfg)
    with pytest.raises(CheckpointError, match="pass --resume"):
        run_pretraining(cfg)


def test_moco_pretraining_runs_end_to_end_and_exports_an_encoder_finetuning_accepts(
    tiny_sites: dict[str, Path], tmp_path: Path
) -> None:
    import math

    from shared.models import nnmobilenet
    from shared.training.initialisation import initialise

    cfg = config(tmp_path, [tiny_sites["ukb"], tiny_sites["mmac"]], 2, "moco")
    cfg = cfg.model_copy(
        update={"pretrain": cfg.pretrain.model_copy(update={"method": "moco", "optimizer": "adamw"})}
    )
    out = run_pretraining(cfg)
    assert len(out.losses) == 2 and all(0 < x < 2 * math.log(cfg.pretrain.moco_queue + 1) for x in out.losses)
    encoder = nnmobilenet(cfg.model.width_mult)
    assert "moco encoder" in initialise(encoder, "moco", str(out.encoder), cfg.model)


def test_mae_pretrains_a_vit_and_exports_an_encoder_finetuning_accepts(
    tiny_sites: dict[str, Path], tmp_path: Path
) -> None:
    """The ViT baseline through `fedretina pretrain`'s own run: MAE's loss, the export of kind mae-encoder,
    and a task model that starts from it (`init: {kind: mae}`)."""
    from shared.models import build_encoder
    from shared.training.initialisation import initialise

    cfg = config(tmp_path, [tiny_sites["ukb"]], 2, "mae")
    cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"arch": "vit_tiny"}),
            "pretrain": cfg.pretrain.model_copy(
                update={"method": "mae", "mask_ratio": 0.75, "optimizer": "adamw"}
            ),
        }
    )
    out = run_pretraining(cfg)
    assert len(out.losses) == 2 and all(0 < x < 10 for x in out.losses)
    _, meta = load_weights(out.encoder)
    assert meta["kind"] == "mae-encoder" and meta["arch"] == "vit_tiny"
    assert "mae encoder" in initialise(build_encoder(cfg.model), "mae", str(out.encoder), cfg.model)


def test_spark_pretrains_on_the_natural_photographs_for_the_domain_question(tmp_path: Path) -> None:
    """`pretrain.images: photos`: SparK on the non-retinal stand-in, no site read; the export is a SparK
    encoder like any other, and MoCo on the photographs is refused in one line."""
    from shared.errors import ConfigError

    cfg = load_config(
        profile="tiny",
        overrides={
            "runs_dir": str(tmp_path / "runs"),
            "name": "spark-photos",
            "pretrain.epochs": 1,
            "pretrain.images": "photos",
            "pretrain.natural_crops": 32,
        },
    )
    out = run_pretraining(cfg)
    assert len(out.losses) == 1 and 0 < out.losses[0] < 2
    _, meta = load_weights(out.encoder)
    assert meta["kind"] == "spark-encoder" and meta["settings"]["pretrain.images"] == "photos"
    cost = json.loads((out.directory / "cost.json").read_text())
    assert cost["images_per_epoch"] == 32 and cost["flops_per_image_step"] > 0  # the 32 crops, no site
    moco = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"method": "moco"})})
    with pytest.raises(ConfigError, match="photos is for masked modelling"):
        run_pretraining(moco.model_copy(update={"name": "moco-photos"}))
