"""`fedretina study pretraining`: does SparK pretraining on unlabelled images make a few labels go further?

1. SparK on the unlabelled sites (`study.pretrain_sites`), centralised: `fedretina pretrain`'s own run
   (runs/NAME/pretrain/), with an encoder snapshot every `study.probe_every` epochs.
2. The linear probe (frozen encoder, logistic regression) of a random encoder and of every snapshot: what
   pretraining put into the features, epoch by epoch, without any fine-tuning.
3. Fine-tuning of {scratch, spark, federated SparK (`study.federated`: `flwr run .` simulations over the same
   sites, simulation/studies/federated_spark.py), + `study.encoders`} x `study.label_counts` x `study.seeds`
   on the labelled `sites`, by `fedretina finetune`'s arm (CV fold 0 of each seed; the label subset, the
   heads' start and the batch order are the same for every init, so arms are paired), each scored on the
   labelled sites' own test split plus the test splits of `study.test_sites` (disjoint patients, the same
   images for every arm).
4. Per label count, each init minus `study.compare_to`: the seeds' mean difference of referable-DR AUC
   (primary), kappa and macro AUC with a paired bootstrap 95% interval over the test images. With
   `study.pretrain_seeds`, SparK is pretrained once per seed (init `spark-seed<k>`) and one more row pools
   them, its interval drawn over images, pretraining seeds and fine-tuning seeds; each federated encoder is
   also paired with the centralised SparK of its seed, and pooled over seeds.

Writes runs/NAME/study/: arms.csv (one row per arm and split), probe.csv, differences.csv, table.md,
summary.json, auc_vs_labels.png and probe.png; every arm's files under seed<k>/. Resumable: the pretraining
continues from its checkpoint and finished arms are kept (`--resume`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from shared.config import ExperimentConfig, InitConfig
from shared.device import configure_torch
from shared.errors import CheckpointError, ConfigError
from shared.plots import curve, metric_vs_labels
from shared.rundir import Report, atomic_write_text, run_dir, start_run_dir
from shared.training.initialisation import check_init
from shared.training.linear_probe import probe_encoder
from simulation.centralised.finetune import Cohort, Study, cohort_images, cohort_of, no_nan
from simulation.centralised.pretrain import run_pretraining
from simulation.studies.federated_spark import FederatedSpark, compute_line, federated_encoder, plan_federated
from simulation.studies.paired import (
    Amount,
    Metric,
    differences,
    differences_table,
    differences_versus,
    means_table,
    pooled_differences,
    run_arms,
    study_metrics,
)

log = logging.getLogger(__name__)
COMPARED = ("referable_auc", "kappa", "auc")  # the primary metric first


def run_pretraining_study(cfg: ExperimentConfig, *, resume: bool = False) -> Report:
    s = cfg.study
    if not s.pretrain_sites:
        raise ConfigError("study.pretrain_sites: name the unlabelled site YAMLs SparK pretrains on")
    if cfg.finetune.task != "dr":
        raise ConfigError(
            f"finetune.task: the study reads referable DR; set it to dr (got {cfg.finetune.task!r})"
        )
    arms_csv = run_dir(cfg, "study") / "arms.csv"
    if arms_csv.exists() and not resume:
        raise CheckpointError(
            f"{arms_csv} exists: pass --resume to finish that study, or pick another --name"
        )
    given = {n: InitConfig(kind="spark", weights=w) for n, w in s.encoders.items()}
    sparks = _pretraining_runs(cfg)
    federated = plan_federated(cfg)
    known = ["scratch", *sparks, *(f.init for f in federated), *given]
    if s.compare_to not in known:
        raise ConfigError(f"study.compare_to: {s.compare_to!r} is not one of {known}")
    for init in given.values():  # before the pretraining: a wrong file is found in seconds, not an hour
        check_init(init.kind, init.weights, cfg.model)
    encoders = {name: _pretrained(pre, resume) for name, pre in sparks.items()}
    pretrained = encoders | {f.init: federated_encoder(f) for f in federated}
    inits = {
        "scratch": InitConfig(),
        **{n: InitConfig(kind="spark", weights=str(e)) for n, e in pretrained.items()},
        **given,
    }
    cfg = cfg.model_copy(
        update={
            "finetune": cfg.finetune.model_copy(update={"protocol": "cv", "inits": inits, "run_folds": 1})
        }
    )
    out = start_run_dir(cfg, "study")
    cohort = cohort_of(cfg, held_out=s.test_sites)
    probe = _probe_curve(cfg, cohort, next(iter(encoders.values())).parent / "encoders", out)
    amounts = [Amount(count=c) for c in s.label_counts]
    arms = run_arms(cfg, cohort, inits, amounts, out, resume=resume)
    metrics = study_metrics(cfg)
    diffs = differences(cfg, out, list(inits), amounts, metrics)
    if len(encoders) > 1 and s.compare_to not in encoders:
        label = f"spark ({len(encoders)} pretraining seeds)"
        pooled = pooled_differences(cfg, out, label, list(encoders), amounts, metrics)
        diffs = pd.concat([diffs, pooled], ignore_index=True)
    if federated:
        versus = _federated_differences(cfg, out, federated, amounts, metrics)
        diffs = pd.concat([diffs, versus], ignore_index=True)
    table = _table(arms, diffs, probe, cfg, amounts, len(cohort.test), federated)
    atomic_write_text(out / "differences.csv", diffs.to_csv(index=False))
    atomic_write_text(out / "table.md", table)
    summary = {"differences": diffs.to_dict("records"), "probe": probe.to_dict("records")}
    atomic_write_text(out / "summary.json", json.dumps(no_nan(summary), indent=2))
    test = arms[arms["split"] == "test"]
    metric_vs_labels(out / "auc_vs_labels.png", test, "referable_auc", title="referable DR AUC (test split)")
    return Report(out, table)


def _federated_differences(
    cfg: ExperimentConfig,
    out: Path,
    federated: list[FederatedSpark],
    amounts: list[Amount],
    metrics: dict[str, Metric],
) -> pd.DataFrame:
    """Each federated encoder minus the centralised SparK of its pretraining seed and, per arm over more
    than one seed, pooled rows (minus centralised SparK, minus `study.compare_to`) whose intervals redraw
    the pretraining seeds too."""
    pairs = [(f.init, f.counterpart) for f in federated]
    parts = [differences_versus(cfg, out, pairs, amounts, metrics)]
    seeds = len(cfg.study.pretrain_seeds)
    for name in cfg.study.federated if seeds > 1 else ():
        mine = [f for f in federated if f.arm == name]
        label = f"{name} ({seeds} pretraining seeds)"
        inits, refs = [f.init for f in mine], [f.counterpart for f in mine]
        parts.append(
            pooled_differences(cfg, out, label, inits, amounts, metrics, references=refs, versus="spark")
        )
        if cfg.study.compare_to not in refs:
            parts.append(pooled_differences(cfg, out, label, inits, amounts, metrics))
    return pd.concat(parts, ignore_index=True)


def _pretraining_runs(cfg: ExperimentConfig) -> dict[str, ExperimentConfig]:
    """The SparK pretraining runs by init name: `spark` in runs/NAME/pretrain/ with the experiment's seed,
    or, per `study.pretrain_seeds` k, `spark-seed<k>` in runs/NAME/spark-seed<k>/pretrain/ with seed k."""
    pre = cfg.model_copy(
        update={
            "sites": cfg.study.pretrain_sites,
            "pretrain": cfg.pretrain.model_copy(
                update={"method": "spark", "export_every": cfg.study.probe_every}
            ),
        }
    )
    seeds = cfg.study.pretrain_seeds
    if not seeds:
        return {"spark": pre}
    return {
        f"spark-seed{k}": pre.model_copy(update={"seed": k, "name": f"{cfg.name}/spark-seed{k}"})
        for k in seeds
    }


def _pretrained(pre: ExperimentConfig, resume: bool) -> Path:
    """The encoder of the pretraining run `pre`: trained here unless finished (continued on --resume)."""
    encoder = run_dir(pre, "pretrain") / "encoder.safetensors"
    if encoder.exists():
        log.info("SparK encoder already pretrained: %s", encoder)
        return encoder
    return run_pretraining(pre, resume=resume).encoder


def _probe_curve(cfg: ExperimentConfig, cohort: Cohort, snapshots: Path, out: Path) -> pd.DataFrame:
    """The linear probe (trained on the development images, scored on the test split) of a random encoder
    (epoch 0) and of every pretraining snapshot, cached in probe.csv."""
    path = out / "probe.csv"
    done = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["epoch"])
    study = Study(cfg, cohort, None, configure_torch(cfg), out)
    train, test = cohort_images(study, cohort.dev, "none"), cohort_images(study, cohort.test, "none")
    rows = done.to_dict("records")
    encoders = [(0, None)] + [
        (int(p.stem.removeprefix("epoch")), p) for p in sorted(snapshots.glob("epoch*.safetensors"))
    ]
    for epoch, weights in encoders:
        if epoch in set(done["epoch"]):
            continue
        metrics = probe_encoder(cfg, weights, train, test, cfg.finetune.task, cohort.num_classes)
        rows.append({"epoch": epoch} | {k: metrics[k] for k in COMPARED})
        log.info("probe after %d pretraining epochs: referable AUC %.3f", epoch, metrics["referable_auc"])
    probe = pd.DataFrame(rows).sort_values("epoch").reset_index(drop=True)
    atomic_write_text(path, probe.to_csv(index=False))
    curve(
        out / "probe.png",
        {k: probe[k].tolist() for k in COMPARED},
        xlabel=f"pretraining epoch (x{cfg.study.probe_every}; 0 = random encoder)",
        ylabel="test metric",
        title="linear probe of the SparK encoder",
    )
    return probe


def _table(
    arms: pd.DataFrame,
    diffs: pd.DataFrame,
    probe: pd.DataFrame,
    cfg: ExperimentConfig,
    amounts: list[Amount],
    test_images: int,
    federated: list[FederatedSpark],
) -> str:
    """Means ± std over seeds per init and label count (test split), then the paired differences with the
    test split's size and the intervals' median half-width (what the study can resolve)."""
    lines = means_table(arms, amounts, list(COMPARED))
    half = ((diffs["referable_auc_high"] - diffs["referable_auc_low"]) / 2).median()
    pooled = "; a pooled row's interval also redraws the pretraining and fine-tuning seeds" * (
        "pretrain_seeds" in diffs
    )
    lines += [
        "",
        f"Paired differences versus {cfg.study.compare_to} (mean over seeds; 95% bootstrap CI over the "
        f"{test_images} test images{pooled}; median half-width of the referable-AUC intervals ±{half:.3f}):",
        "",
        *differences_table(diffs, amounts, list(COMPARED)),
    ]
    if federated:
        lines += ["", "Federated SparK (a `flwr run .` simulation, one site per unlabelled site):", ""]
        lines += [f"- {compute_line(f)}" for f in federated]
    best = probe.loc[probe["referable_auc"].idxmax()]
    lines += [
        "",
        f"Linear probe (referable AUC, test split): random encoder {probe['referable_auc'].iloc[0]:.3f}; "
        f"best {best['referable_auc']:.3f} after {int(best['epoch'])} pretraining epochs.",
    ]
    return "\n".join(lines) + "\n"
