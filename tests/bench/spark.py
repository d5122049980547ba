"""SparK step cost at the cpu profile: masked step / dense step for the same encoder + decoder, images per
second, peak memory (each mode in its own process), and our step against SparK's own (re-implemented in
`tests/bench/spark_reference.py`) at two widths, interleaved in one process."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from shared.config import load_config
from shared.spark.spark import SparK, masked_patch_loss
from shared.training.pretrain import build_spark, pretrain_optimizer
from tests.bench.spark_reference import reference_loss

BATCH, ROUNDS = 16, 8
# (width, batch, decoder width) of the comparison with SparK's own step: the cpu profile and a wider one
REFERENCE_SETUPS = ((0.5, 16, 128), (1.0, 32, 256))


def dense_loss(model: SparK, images: torch.Tensor) -> torch.Tensor:
    """The same encoder, densify layers and decoder run densely, the loss over every patch: the baseline."""
    feats = model.encoder.forward_features(images)[::-1]
    to_dec = [
        proj(norm(f)) for f, norm, proj in zip(feats, model.densify_norms, model.densify_projs, strict=True)
    ]
    rec = model.decoder(to_dec)
    grid = images.shape[-1] // model.downsample_ratio
    return masked_patch_loss(images, rec, torch.zeros(images.shape[0], 1, grid, grid, dtype=torch.bool))


def step_seconds(mode: str, steps: int, warmup: int = 2) -> list[float]:
    cfg = load_config(profile="cpu")
    torch.manual_seed(0)
    model = build_spark(cfg)
    optimizer = pretrain_optimizer(model, cfg)
    images = torch.randn(BATCH, 3, cfg.data.image_size, cfg.data.image_size)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss = model(images, generator=g)[0] if mode == "masked" else dense_loss(model, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def against_reference(width: float, batch: int, decoder: int, rounds: int = ROUNDS) -> dict:
    """Our step and SparK's on the same model (weights, width, 128 px, batch, decoder, AdamW), alternating
    step by step with the same masks: the median of each, their ratio, and both losses at the first step."""
    overrides = {"model.width_mult": width, "pretrain.decoder_width": decoder, "pretrain.optimizer": "adamw"}
    cfg = load_config(profile="cpu", overrides=overrides)
    torch.manual_seed(0)
    model = build_spark(cfg)
    optimizer = pretrain_optimizer(model, cfg)
    images = torch.randn(batch, 3, cfg.data.image_size, cfg.data.image_size)
    with torch.no_grad():
        mask = model.draw_mask(images, torch.Generator().manual_seed(0))
        first = {
            "ours": float(model(images, mask)[0]),
            "reference": float(reference_loss(model, images, mask)),
        }
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    for i in range(rounds + 1):  # the first round warms both up
        mask = model.draw_mask(images, torch.Generator().manual_seed(i))
        for name in ("ours", "reference"):
            t = time.perf_counter()
            loss = model(images, mask)[0] if name == "ours" else reference_loss(model, images, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if i:
                times[name].append(time.perf_counter() - t)
    ours, reference = statistics.median(times["ours"]), statistics.median(times["reference"])
    return {
        "ours_over_reference_step_time": ours / reference,
        "ours_step_s": ours,
        "reference_step_s": reference,
        "first_loss_ours": first["ours"],
        "first_loss_reference": first["reference"],
    }


def peak_rss_kb(mode: str) -> int:
    """Peak resident memory of a fresh process after three steps of `mode` (run in its own process)."""
    step_seconds(mode, 3)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run(out: Path) -> dict:
    masked, dense = [], []
    step_seconds("masked", 1), step_seconds("dense", 1)  # warm caches and allocators
    for _ in range(ROUNDS):  # interleaved, so load on the machine hits both modes alike
        masked += step_seconds("masked", 1, warmup=1)
        dense += step_seconds("dense", 1, warmup=1)
    result = {
        "masked_over_dense_step_time": statistics.median(masked) / statistics.median(dense),
        "masked_over_dense_step_time_target": "<= 1.10",
        "masked_step_s_batch16": statistics.median(masked),
        "dense_step_s_batch16": statistics.median(dense),
        "spark_images_per_s_cpu_profile": BATCH / statistics.median(masked),
    }
    for mode in ("masked", "dense"):
        code = f"from tests.bench.spark import peak_rss_kb; print(peak_rss_kb({mode!r}))"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        result[f"peak_rss_mb_{mode}"] = int(done.stdout) / 1024
    for width, batch, decoder in REFERENCE_SETUPS:
        setup = f"w{width}_bs{batch}_dec{decoder}"
        for key, value in against_reference(width, batch, decoder).items():
            result[f"{key}_{setup}"] = value
        result[f"ours_over_reference_step_time_{setup}_target"] = "<= 0.8"
    out.mkdir(parents=True, exist_ok=True)
    (out / "steps.json").write_text(json.dumps({"masked": masked, "dense": dense}))
    return {k: round(v, 6 if "loss" in k else 3) if isinstance(v, float) else v for k, v in result.items()}
