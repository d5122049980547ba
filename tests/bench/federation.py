"""Federation at the cpu profile: the IID 4-site simulation (real `flwr run .`) against centralised training
on the same data with the same number of sample-gradient steps: `fedretina pretrain` for as many epochs as
the federation has pretraining rounds, then `fedretina finetune` with the hold-out protocol (the
federation's) from that encoder for as many epochs as it has fine-tuning rounds.

Reports: federated round time / centralised epoch time (rounds after the first, which starts Ray and fills
caches), bytes per round per site, and the downstream gap: DR AUC and referable-DR AUC of both final models on
the EyePACS-like site's held-out test split, with a paired bootstrap 95% interval of the federated-minus-
centralised AUC difference. The noise floor beside it: the same gap between two centralised runs that differ
only in seed.
"""

from __future__ import annotations

import shutil
import sqlite3
import statistics
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from shared.config import ExperimentConfig, InitConfig, load_config
from shared.data.checks import check_site
from shared.data.manifest import labelled
from shared.data.site import Site
from shared.data.site_config import load_site_config
from shared.data.synth.catalogue import PLANS
from shared.data.synth.layouts import render_jobs, write_eyepacs
from shared.metrics import auc_score, bootstrap_ci, evaluate_predictions
from shared.training.data import site_images
from shared.training.finetune import build_task_model, predict
from shared.weights import load_weights
from simulation.centralised.finetune import run_finetuning
from simulation.centralised.pretrain import run_pretraining
from tests.conftest import ROOT, site_yaml
from tests.integration.flower import Flower, iid_scenario, sets

# 16 fine-tuning rounds: both models level off (at 8 the centralised one was still improving); the test split
# (~240 images) is large enough to read an AUC from.
ROUNDS = {"federation.rounds_pretrain": 3, "federation.rounds_finetune": 16, "federation.min_sites": 4}
PATIENTS = 600
# Generous: a slower machine (one ran SparK 1.7x slower than ours) finishes rather than dies; a stuck run
# still ends, and the rounds it finished are reported.
FLWR_LIMIT_S = 3 * 3600


def run(out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # a stale run would be refused, and its store read as this one's
    plan = next(p for p in PLANS["cpu"] if p.name == "eyepacs")
    render_jobs(write_eyepacs(out / "eyepacs", PATIENTS, 0, plan.height, plan.styles), workers=2)
    site_path = site_yaml(out, "eyepacs", out / "eyepacs")
    config = load_site_config(site_path)
    site = Site(config.name, config, check_site(config).manifest)
    scenario = iid_scenario(out, site_path.resolve(), 4)
    flower = Flower(out / "flwr-home", ROOT)
    try:
        done = flower.run(
            4,
            {
                "profile": "cpu",
                "scenario": str(scenario),
                "run-name": "iid4",
                "set": sets(runs_dir=out / "runs", **{k.replace(".", "__"): v for k, v in ROUNDS.items()}),
            },
            timeout=FLWR_LIMIT_S,
        )
    except subprocess.TimeoutExpired:
        done = None
    finally:
        flower.stop()
    fed_store = out / "runs" / "iid4" / "federation" / "store.sqlite"
    # `flwr run --stream` can exit 0 when the run itself failed: the store says how it ended
    if done is None or done.returncode != 0 or _status(fed_store) != "completed":
        return _unfinished(fed_store, done)
    cfg = load_config(
        profile="cpu", overrides=ROUNDS | {"sites": [str(site_path)], "runs_dir": str(out / "runs")}
    )
    central = _centralised(cfg, "central")
    rounds = _round_seconds(fed_store)
    result: dict = {
        "federated_round_over_centralised_epoch_pretrain": statistics.median(rounds["pretrain"][1:])
        / statistics.median(central["pretrain"]),
        "federated_round_over_centralised_epoch_pretrain_target": "<= 1.15",
        "federated_round_over_centralised_epoch_finetune": statistics.median(rounds["finetune"][1:])
        / statistics.median(central["finetune"]),
        "centralised_pretrain_epoch_s": statistics.median(central["pretrain"]),
        **_bytes(fed_store),
    }
    fed_model, _ = load_weights(out / "runs" / "iid4" / "federation" / "model.safetensors")
    reseeded = _centralised(cfg.model_copy(update={"seed": cfg.seed + 1}), "central-reseeded")
    test = labelled(site.rows, "dr")
    test = test[test["split"] == "test"]
    models = {
        "federated": fed_model,
        "centralised": central["model"],
        "centralised_reseeded": reseeded["model"],
    }
    predictions = {name: _predict(cfg, site, test, state) for name, state in models.items()}
    for name, (y, probs) in predictions.items():
        metrics = evaluate_predictions(y, probs, "dr")
        result[f"dr_auc_{name}"], result[f"referable_auc_{name}"] = metrics["auc"], metrics["referable_auc"]
    result["dr_auc_gap"] = abs(result["dr_auc_federated"] - result["dr_auc_centralised"])
    result["dr_auc_gap_target"] = "<= 0.01"
    y, fed, cen = predictions["federated"][0], predictions["federated"][1], predictions["centralised"][1]
    paired = np.concatenate([fed, cen], axis=1)
    low, high = bootstrap_ci(y, paired, lambda t, p: auc_score(t, p[:, :5]) - auc_score(t, p[:, 5:]))
    result["dr_auc_difference_ci_low"], result["dr_auc_difference_ci_high"] = low, high
    result["dr_auc_gap_between_centralised_seeds"] = abs(
        result["dr_auc_centralised_reseeded"] - result["dr_auc_centralised"]
    )
    result["referable_auc_gap"] = abs(result["referable_auc_federated"] - result["referable_auc_centralised"])
    result["test_images"] = len(test)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}


def _centralised(cfg: ExperimentConfig, name: str) -> dict:
    """Both phases through the CLI's own functions: the final model and each phase's epoch seconds."""
    f = cfg.federation
    pretrain = cfg.pretrain.model_copy(update={"epochs": f.rounds_pretrain * f.local_epochs})
    spark = run_pretraining(cfg.model_copy(update={"name": name, "pretrain": pretrain}))
    finetune = cfg.finetune.model_copy(
        update={
            "protocol": "holdout",
            "label_fractions": (1.0,),
            "epochs": f.rounds_finetune * f.local_epochs,
            "inits": {"spark": InitConfig(kind="spark", weights=str(spark.encoder))},
        }
    )
    ft = run_finetuning(cfg.model_copy(update={"name": name, "finetune": finetune})).directory
    history = pd.read_csv(ft / "history" / "spark_100pct_fold0.csv")
    model, _ = load_weights(ft / "checkpoints" / "spark_100pct_fold0.safetensors")
    return {"pretrain": spark.history.seconds, "finetune": history["seconds"].tolist(), "model": model}


def _status(store: Path) -> str:
    if not store.is_file():
        return "missing"
    db = sqlite3.connect(store)
    try:
        row = db.execute("SELECT status FROM runs WHERE run_name = 'iid4'").fetchone()
    finally:
        db.close()
    return row[0] if row else "missing"


def _unfinished(store: Path, done: subprocess.CompletedProcess[str] | None) -> dict:
    """What a federation that did not finish got to: why it stopped, and its rounds' times so far."""
    why = f"flwr run passed its {FLWR_LIMIT_S} s limit" if done is None else "flwr run failed"
    if done is not None:
        print(done.stdout[-2000:], done.stderr[-2000:])
    rounds = _round_seconds(store) if store.is_file() else {"pretrain": [], "finetune": []}
    return {
        "failed": f"{why} ({_status(store)}) after {len(rounds['pretrain'])} pretraining and "
        f"{len(rounds['finetune'])} fine-tuning rounds of {ROUNDS['federation.rounds_pretrain']} + "
        f"{ROUNDS['federation.rounds_finetune']}",
        **{f"round_s_median_{phase}": statistics.median(s) for phase, s in rounds.items() if s},
    }


def _round_seconds(store: Path) -> dict[str, list[float]]:
    db = sqlite3.connect(store)
    try:
        rows = db.execute("SELECT phase, finished - started FROM rounds ORDER BY phase, round").fetchall()
    finally:
        db.close()
    out: dict[str, list[float]] = {"pretrain": [], "finetune": []}
    for phase, seconds in rows:
        out[phase].append(seconds)
    return out


def _bytes(store: Path) -> dict[str, float]:
    db = sqlite3.connect(store)
    try:
        rows = db.execute(
            "SELECT phase, avg(bytes) FROM replies WHERE kind = 'train' AND accepted = 1 GROUP BY phase"
        )
        return {f"reply_mb_per_site_per_round_{phase}": value / 1e6 for phase, value in rows.fetchall()}
    finally:
        db.close()


def _predict(
    cfg: ExperimentConfig, site: Site, rows: pd.DataFrame, state: dict[str, torch.Tensor]
) -> tuple[np.ndarray, np.ndarray]:
    model = build_task_model(cfg, {"dr": 5})
    model.load_state_dict(state)
    data = site_images(site, cfg, cfg.finetune_image_size, "none", rows=rows, task="dr")
    return predict(model, data, "dr", torch.device("cpu"))
