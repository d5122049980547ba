"""`fedretina pretrain`: pretraining on the pooled images of the configured sites, centralised (or, with
`pretrain.method: natural`, on scikit-image's natural photographs, the stand-in for ImageNet).

It runs the same `run_phase` a federated site's round runs, from the same seeded model, so one simulated
site holding these images reproduces it bitwise (SparK; MoCo v2 is centralised only). Resumable at epoch
boundaries: the checkpoint holds the model, the optimiser and the record of every setting that shaped it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from shared.config import ExperimentConfig
from shared.data.dataset import TwoViews
from shared.data.site import Site
from shared.data.transforms import FUNDUS_MEAN, FUNDUS_STD
from shared.device import configure_torch
from shared.errors import CheckpointError, ConfigError
from shared.plots import curve
from shared.privacy.central import LEDGER, private_sgd, release
from shared.privacy.ledger import Ledger
from shared.rundir import atomic_write_text, run_dir, start_run_dir
from shared.spark.preview import save_preview
from shared.training.checkpoint import export_encoder, load_checkpoint, save_checkpoint
from shared.training.cost import flops_per_image
from shared.training.data import data_key, load_sites, pooled, site_images
from shared.training.initialisation import check_init, pretraining_start
from shared.training.moco import check_queue, moco_method
from shared.training.natural import natural_images, natural_method
from shared.training.phase import EpochEnd, Span, run_phase
from shared.training.pretrain import spark_method
from shared.weights import check_settings, weights_meta

log = logging.getLogger(__name__)
PREVIEW_IMAGES = 6
LOSS_NAMES = {
    "spark": "masked-patch loss",
    "moco": "InfoNCE loss",
    "natural": "cross-entropy",
    "mae": "hidden-patch loss",
}


@dataclass
class History:
    """Per epoch: mean loss and training seconds (resumed runs carry the earlier epochs')."""

    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class PretrainOutputs:
    encoder: Path
    history: History
    directory: Path

    @property
    def losses(self) -> list[float]:
        return self.history.losses


def run_pretraining(
    cfg: ExperimentConfig, *, resume: bool = False, sites: list[Site] | None = None
) -> PretrainOutputs:
    """Pretrain (SparK or MoCo v2 on the pooled images of `cfg.sites`, or of the given `sites`; or the
    natural-photo classifier); resumable at epoch boundaries."""
    checkpoint = run_dir(cfg, "pretrain") / "checkpoint.safetensors"
    if checkpoint.exists() and not resume:
        raise CheckpointError(
            f"{checkpoint} exists: pass --resume to continue that run, or pick another --name"
        )
    check_init(cfg.pretrain.init.kind, cfg.pretrain.init.weights, cfg.model)
    if cfg.pretrain.images == "photos" and cfg.pretrain.method == "moco":
        raise ConfigError(
            "pretrain.images: photos is for masked modelling (spark, mae); moco reads the sites"
        )
    photos = cfg.pretrain.method == "natural" or cfg.pretrain.images == "photos"
    sites = [] if photos else sites or load_sites(cfg.sites)
    data = {"": natural_images(cfg) if photos else _images(sites, cfg)}
    if cfg.pretrain.method == "moco":
        check_queue(cfg, len(data[""]))
    out = start_run_dir(cfg, "pretrain")
    device = configure_torch(cfg)
    model = pretraining_start(cfg).to(device)
    history, optimizer_state = History(), None
    if resume and checkpoint.exists():
        history, optimizer_state = _resumed(checkpoint, model, cfg)
        log.info("resuming %s after epoch %d", out, len(history.losses))
    spark = cfg.pretrain.method == "spark"
    methods = {"spark": spark_method, "moco": moco_method, "natural": natural_method, "mae": spark_method}
    method = methods[cfg.pretrain.method](model, cfg, device)  # type: ignore[operator]
    key = "natural" if photos else data_key(sites)
    ledger = Ledger(out / LEDGER)
    plan = Span.epochs(cfg.pretrain.epochs).private_plan({"": len(data[""])}, cfg.pretrain.batch_size)
    sgd = private_sgd(cfg, ledger, "pretrain", plan, cfg.pretrain.batch_size)
    preview = _preview_batch(sites, cfg).to(device) if spark and sites else None
    build = methods[cfg.pretrain.method]
    flops = flops_per_image(lambda m: build(m, cfg, device), model, data[""])  # type: ignore[operator]
    log.info(
        "%s pretraining on %d images from %s, device %s, %.2f GFLOPs per image per step",
        cfg.pretrain.method,
        len(data[""]),
        key,
        device,
        flops / 1e9,
    )
    run_phase(
        method,
        data,
        Span.epochs(cfg.pretrain.epochs, start=len(history.losses)),
        seed=cfg.seed,
        key=key,
        workers=cfg.data.workers,
        optimizer_state=optimizer_state,
        after_epoch=lambda end: _after_epoch(end, cfg, model, history, checkpoint, preview),
        privacy=sgd,
    )
    encoder = out / "encoder.safetensors"
    privacy = {}
    if sgd is not None:  # the exported encoder's whole lineage: every planned epoch, resumed or not
        spent = release(cfg, ledger, "pretrain", [(sgd.sigma, q, n) for q, n in plan])
        privacy = {"epsilon": spent, "delta": cfg.privacy.delta, "privacy_unit": cfg.privacy.unit}
    export_encoder(encoder, model.encoder.state_dict(), cfg, epochs=len(history.losses), **privacy)
    _write_history(out, history, LOSS_NAMES[cfg.pretrain.method])
    _write_cost(out, flops, len(data[""]), history)
    log.info("encoder exported to %s", encoder)
    return PretrainOutputs(encoder, history, out)


def _images(sites: list[Site], cfg: ExperimentConfig) -> Dataset:
    moco = cfg.pretrain.method == "moco"  # two views of each image; masked modelling sees one
    views = [site_images(s, cfg, cfg.data.image_size, "moco" if moco else "light") for s in sites]
    return pooled([TwoViews(v) for v in views] if moco else views)


def _resumed(checkpoint: Path, model: nn.Module, cfg: ExperimentConfig) -> tuple[History, dict | None]:
    """The history and optimiser state of an interrupted run, after refusing any changed setting."""
    saved = load_checkpoint(checkpoint, model=model, expected={"kind": f"{cfg.pretrain.method}-checkpoint"})
    check_settings(checkpoint, saved.meta, cfg)
    return History(list(saved.meta["losses"]), list(saved.meta["seconds"])), saved.optimizer


def _after_epoch(
    end: EpochEnd,
    cfg: ExperimentConfig,
    model: nn.Module,
    history: History,
    checkpoint: Path,
    preview: torch.Tensor | None,
) -> bool:
    """Log the epoch, checkpoint it when due, and save a reconstruction preview when due."""
    p, epoch = cfg.pretrain, end.epoch + 1
    history.losses.append(end.loss)
    history.seconds.append(end.seconds)
    log.info("epoch %d/%d  loss %.4f  %.1f s", epoch, p.epochs, end.loss, end.seconds)
    last = epoch == p.epochs
    if last or epoch % p.checkpoint_every == 0:
        meta = weights_meta(
            cfg,
            f"{p.method}-checkpoint",
            epoch=epoch,
            step=end.step,
            losses=history.losses,
            seconds=history.seconds,
        )
        save_checkpoint(checkpoint, meta, model=model, optimizer=end.optimizer)
    if p.export_every and epoch % p.export_every == 0:
        snapshot = checkpoint.parent / "encoders" / f"epoch{epoch:04d}.safetensors"
        export_encoder(snapshot, model.encoder.state_dict(), cfg, epochs=epoch)
    if preview is not None and (last or (p.preview_every and epoch % p.preview_every == 0)):
        image = checkpoint.parent / "previews" / f"epoch{epoch:04d}.png"
        save_preview(image, model, preview, FUNDUS_MEAN, FUNDUS_STD)
    return False


def _preview_batch(sites: list[Site], cfg: ExperimentConfig) -> torch.Tensor:
    """The same few images every time (the first of the first site), unaugmented."""
    rows = sites[0].rows.head(PREVIEW_IMAGES)
    data = site_images(sites[0], cfg, cfg.data.image_size, "none", rows=rows)
    return torch.stack([data[i]["image"] for i in range(len(data))])


def _write_cost(out: Path, flops: float, images: int, history: History) -> None:
    """cost.json: FLOPs per image per step, the images an epoch passes over, and the run's total FLOPs and
    training seconds (all epochs, resumed ones included)."""
    epochs = len(history.losses)
    cost = {
        "flops_per_image_step": flops,
        "images_per_epoch": images,
        "epochs": epochs,
        "total_flops": flops * images * epochs,
        "train_seconds": sum(history.seconds),
    }
    atomic_write_text(out / "cost.json", json.dumps(cost, indent=2))


def _write_history(out: Path, history: History, label: str) -> None:
    rows = zip(history.losses, history.seconds, strict=True)
    lines = [
        f"epoch,{label.replace(' ', '_')},seconds",
        *(f"{i + 1},{x:.6f},{s:.3f}" for i, (x, s) in enumerate(rows)),
    ]
    atomic_write_text(out / "history.csv", "\n".join(lines) + "\n")
    curve(out / "loss.png", {label: history.losses}, xlabel="epoch", ylabel="loss", title="pretraining")
