"""DP-SGD at the cpu profile: the cost of a private step, and what privacy costs downstream.

- step: one training step of the nn-MobileNet-GN classifier (batch 16 at 224 px, AdamW) with and without
  DP-SGD (per-sample gradients in Opacus's functorch and hooks modes, patient-level clipping, noise),
  interleaved in one process; the ratios use the minimum over repeats (the least disturbed run);
- downstream: `fedretina finetune` (hold-out protocol, from scratch, GroupNorm) on an EyePACS-like site
  without DP, at epsilon 8 and 3 (delta 1e-5, the patient as the unit), and with DP-SGD's sampling and
  clipping but no noise (what the noise alone costs), DR AUC on its test split.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from shared.config import ExperimentConfig, load_config
from shared.data.checks import check_site
from shared.data.manifest import labelled
from shared.data.site import Site
from shared.data.site_config import load_site_config
from shared.data.synth.catalogue import PLANS
from shared.data.synth.layouts import render_jobs, write_eyepacs
from shared.metrics import evaluate_predictions
from shared.privacy.sgd import PrivateSGD
from shared.training.data import site_images
from shared.training.finetune import build_task_model, predict
from shared.weights import load_weights
from simulation.centralised.finetune import run_finetuning
from tests.conftest import site_yaml

BATCH, SIZE, REPEATS = 16, 224, 4
PATIENTS = 300
PRIVATE = {"model.norm": "gn", "pretrain.loss_reduction": "sample"}


def run(out: Path) -> dict:
    result = _step_ratios()
    result |= _downstream(out)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}


def _step_ratios() -> dict:
    cfg = load_config(profile="cpu", overrides=PRIVATE)
    torch.manual_seed(0)
    images, labels = torch.randn(BATCH, 3, SIZE, SIZE), torch.randint(0, 5, (BATCH,))
    batch = {"image": images, "label": labels, "unit": torch.arange(BATCH) // 2}  # two eyes a patient
    times: dict[str, list[float]] = {"plain": [], "functorch": [], "hooks": []}
    models = {mode: build_task_model(cfg, {"dr": 5}) for mode in times}
    for _ in range(1 + REPEATS):  # the first round warms up
        for mode, model in models.items():
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            sgd = PrivateSGD(1.0, 1.0, "patient", BATCH, mode) if mode != "plain" else None
            times[mode].append(_step(model, optimizer, batch, sgd))
    best = {mode: min(t[1:]) for mode, t in times.items()}
    return {
        "dp_step_over_plain_functorch": best["functorch"] / best["plain"],
        "dp_step_over_plain_functorch_target": "2-2.5 (anchor: MobileNet-GN, bs 16 @ 224)",
        "dp_step_over_plain_hooks": best["hooks"] / best["plain"],
        "plain_gn_step_s": best["plain"],
        "plain_gn_step_median_s": statistics.median(times["plain"][1:]),
    }


def _step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, sgd: PrivateSGD | None
) -> float:
    started = time.perf_counter()
    if sgd is None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch["image"], "dr"), batch["label"]).backward()
        optimizer.step()
        return time.perf_counter() - started
    with sgd.attached(model, optimizer) as dp:
        dp.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch["image"], "dr"), batch["label"]).backward()
        sgd.before_step(batch)
        dp.step()
    return time.perf_counter() - started


def _downstream(out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    plan = next(p for p in PLANS["cpu"] if p.name == "eyepacs")
    render_jobs(write_eyepacs(out / "eyepacs", PATIENTS, 0, plan.height, plan.styles), workers=2)
    site_path = site_yaml(out, "eyepacs", out / "eyepacs")
    config = load_site_config(site_path)
    site = Site(config.name, config, check_site(config).manifest)
    common = PRIVATE | {
        "sites": [str(site_path)],
        "runs_dir": str(out / "runs"),
        "finetune.protocol": "holdout",
    }
    test = labelled(site.rows, "dr")
    test = test[test["split"] == "test"]
    result: dict = {"test_images": len(test)}
    variants = {"no_dp": {}, "eps8": {"privacy.enabled": True, "privacy.target_epsilon": 8.0}}
    variants["eps3"] = variants["eps8"] | {"privacy.target_epsilon": 3.0}
    # Poisson batches of patients and per-patient clipping without noise (no privacy): what noise costs
    variants["clip_only"] = {"privacy.enabled": True, "privacy.noise_multiplier": 0.0}
    for name, overrides in variants.items():
        cfg = load_config(profile="cpu", overrides=common | overrides | {"name": name})
        started = time.perf_counter()
        directory = run_finetuning(cfg).directory
        result[f"finetune_s_{name}"] = time.perf_counter() - started
        model, _ = load_weights(directory / "checkpoints" / "scratch_100pct_fold0.safetensors")
        y, probs = _predict(cfg, site, test, model)
        metrics = evaluate_predictions(y, probs, "dr")
        result[f"dr_auc_{name}"], result[f"referable_auc_{name}"] = metrics["auc"], metrics["referable_auc"]
        if name != "no_dp":
            folds = pd.read_csv(directory / "folds.csv")
            result[f"epsilon_{name}"] = float(folds["epsilon"].max())
    return result


def _predict(cfg: ExperimentConfig, site: Site, rows: pd.DataFrame, state: dict) -> tuple:
    model = build_task_model(cfg, {"dr": 5})
    model.load_state_dict(state)
    data = site_images(site, cfg, cfg.finetune_image_size, "none", rows=rows, task="dr")
    return predict(model, data, "dr", torch.device("cpu"), cfg.finetune.batch_size)
