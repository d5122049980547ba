"""Generator and pipeline throughput at the cpu profile (2 processes where the product uses 2), and the
pipeline against what training consumes at both profiles (target: the pipeline delivers >= 3x)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader

from shared.config import ExperimentConfig, load_config
from shared.data.cache import ImageCache
from shared.data.checks import read_site
from shared.data.dataset import FundusDataset
from shared.data.fundus import preprocess
from shared.data.site_config import load_site_config
from shared.data.synth.catalogue import PLANS
from shared.data.synth.layouts import render_jobs, write_eyepacs
from shared.data.synth.population import DR_WEIGHTS, people
from shared.data.synth.render import CAMERA_STYLES, render_fundus
from shared.training.finetune import build_task_model, finetune_optimizer
from shared.training.pretrain import build_spark, pretrain_optimizer
from tests.conftest import site_yaml


def run(out: Path) -> dict:
    cfg = load_config(profile="cpu")
    height = next(p.height for p in PLANS["cpu"] if p.name == "eyepacs")
    size = cfg.data.image_size
    result: dict = {}
    spec = people(1, 0, dr=DR_WEIGHTS)[0].spec("left")
    for h in (128, height, 256):
        t = time.perf_counter()
        for _ in range(20):
            render_fundus(spec, CAMERA_STYLES["eyepacs-mixed-a"], h)
        result[f"render_ms_per_image_{h}px_1proc"] = 1000 * (time.perf_counter() - t) / 20
    root = out / "eyepacs"
    jobs = write_eyepacs(root, 200, 0, height, ("eyepacs-mixed-a", "eyepacs-mixed-b"))
    t = time.perf_counter()
    render_jobs(jobs, workers=2)
    result[f"generator_images_per_s_{height}px_2proc"] = len(jobs) / (time.perf_counter() - t)
    site = load_site_config(site_yaml(out, "eyepacs", root))
    rows = read_site(site).manifest
    t = time.perf_counter()
    for path in rows.path[:100]:
        preprocess(Path(path), size)
    result[f"decode_crop_images_per_s_{size}px_1proc"] = 100 / (time.perf_counter() - t)
    cache = ImageCache(out / "cache", size)
    t = time.perf_counter()
    cache.ensure(rows, workers=2)
    result[f"cache_build_images_per_s_{size}px_2proc"] = len(rows) / (time.perf_counter() - t)
    for recipe in ("light", "heavy"):
        dataset = FundusDataset(rows, size, recipe, cache=cache)
        loader = DataLoader(dataset, batch_size=16, shuffle=False, num_workers=2)
        t, n = time.perf_counter(), 0
        for batch in loader:
            n += batch["image"].shape[0]
        result[f"augmented_images_per_s_{recipe}_{size}px_2workers"] = n / (time.perf_counter() - t)
    direct = FundusDataset(rows.head(100), size, "heavy")
    t = time.perf_counter()
    for i in range(len(direct)):
        direct[i]
    result[f"uncached_heavy_images_per_s_{size}px_1proc"] = len(direct) / (time.perf_counter() - t)
    result["cache_speedup"] = (
        result[f"augmented_images_per_s_heavy_{size}px_2workers"]
        / result[f"uncached_heavy_images_per_s_{size}px_1proc"]
    )
    for profile in ("cpu", "paper"):
        result |= pipeline_over_consumption(profile, rows, out / f"cache-{profile}")
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def pipeline_over_consumption(profile: str, rows: pd.DataFrame, cache_dir: Path) -> dict:
    """Per phase: images/s the loader delivers (the phase's recipe and size, from the cache, the profile's
    workers, at most 2 here) over images/s one training step consumes (masked SparK step, classifier step;
    batches of at most 8 at the paper profile, whose own would not fit a CPU's time budget)."""
    cfg = load_config(profile=profile)
    workers = min(cfg.data.workers, 2)
    out: dict = {}
    phases = {
        "pretrain": (cfg.data.image_size, "light", min(cfg.pretrain.batch_size, 16)),
        "finetune": (cfg.finetune_image_size, cfg.finetune.augment, min(cfg.finetune.batch_size, 16)),
    }
    if profile == "paper":
        phases = {k: (size, recipe, 8) for k, (size, recipe, _) in phases.items()}
    for phase, (size, recipe, batch) in phases.items():
        cache = ImageCache(cache_dir, size)
        cache.ensure(rows, workers=2)
        dataset = FundusDataset(rows, size, recipe, cache=cache)
        loader = DataLoader(dataset, batch_size=batch, num_workers=workers)
        t, n = time.perf_counter(), 0
        for images in loader:
            n += images["image"].shape[0]
        delivered = n / (time.perf_counter() - t)
        consumed = batch / step_seconds(cfg, phase, size, batch)
        key = f"{profile}_{phase}_{size}px_{recipe}"
        out[f"pipeline_images_per_s_{key}_{workers}workers"] = delivered
        out[f"trainer_images_per_s_{key}"] = consumed
        out[f"pipeline_over_trainer_{key}"] = delivered / consumed
        out[f"pipeline_over_trainer_{key}_target"] = ">= 3"
    return out


def step_seconds(cfg: ExperimentConfig, phase: str, size: int, batch: int, steps: int = 2) -> float:
    """Median seconds of a training step (after one warm-up) on random images of the phase's size."""
    torch.manual_seed(0)
    images = torch.randn(batch, 3, size, size)
    if phase == "pretrain":
        model = build_spark(cfg)
        optimizer = pretrain_optimizer(model, cfg)

        def loss() -> torch.Tensor:
            return model(images, generator=torch.Generator().manual_seed(0))[0]
    else:
        model = build_task_model(cfg, {"dr": 5})
        optimizer = finetune_optimizer(model, cfg)
        labels = torch.arange(batch) % 5

        def loss() -> torch.Tensor:
            return torch.nn.functional.cross_entropy(model(images, "dr"), labels)

    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])
