"""`fedretina study seed2`: the second seed's study (Srinivasan et al., PLOS ONE 2022), whole, plus SparK.

Per architecture (`study.archs`: ResNet50 as the paper, nn-MobileNet as the first seed), five setups, each
fine-tuned at every `finetune.label_fractions` x `study.seeds` (paired arms, `simulation/studies/paired.py`):
- IWNE-FS: random initialisation, fully supervised fine-tuning;
- IWNE-CL: MoCo v2 on the unlabelled target-domain images (`study.pretrain_sites`) from random weights;
- IFI-FS: the ImageNet start: local weights from `study.imagenet`, or, where none is given, our supervised
  pretraining on scikit-image's natural photographs (the offline stand-in, shared/data/photos.py), which
  every table names as such;
- IFI-CL: MoCo v2 on the target domain from that ImageNet start;
- SparK: SparK on the target domain from random weights (the first seed's method).
Each pretraining is `fedretina pretrain`'s own run under runs/NAME/seed2/<arch>/<setup>/pretrain/, resumed
or reused. Epochs are selected on the validation AUC (`finetune.select_metric`); every model is scored on the
labelled sites' test split and on the `study.external_sites` (a Messidor-2-like site). Referable DR is read
both ways: summed probabilities of the referable grades (ours) and the paper's summed logits with a softmax
over the two sums; the table names each.

Writes runs/NAME/seed2/: arms.csv (every arm and split, with an `arch` column), differences.csv (each setup
minus IWNE-FS, paired 95% CIs, test and external), table.md, and per architecture the AUC-vs-label-fraction
figure (the paper's Fig 2) for the test and the external split. Resumable (`--resume`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from shared.config import ExperimentConfig, InitConfig, override
from shared.data.photos import SOURCE as NATURAL_SOURCE
from shared.errors import CheckpointError, ConfigError
from shared.plots import metric_vs_labels
from shared.rundir import Report, atomic_write_text, run_dir, start_run_dir
from shared.training.initialisation import check_init
from simulation.centralised.finetune import cohort_of, no_nan
from simulation.centralised.pretrain import run_pretraining
from simulation.studies.paired import (
    Amount,
    Metric,
    arm_metrics,
    differences,
    differences_table,
    means_table,
    run_arms,
    study_metrics,
)

log = logging.getLogger(__name__)
PART = "seed2"
REFERENCE = "IWNE-FS"
SPLITS = ("test", "external")
SHOWN = ("referable_auc", "referable_auc_logits", "kappa", "auc")
NAMES = {
    "referable_auc": "referable AUC (summed probabilities)",
    "referable_auc_logits": "referable AUC (paper: summed logits, softmax)",
    "kappa": "kappa",
    "auc": "macro AUC",
}


@dataclass(frozen=True)
class Setup:
    """One of the study's encoder starts: its init for fine-tuning, and what it is, in words."""

    init: InitConfig
    start: str


def run_seed2_study(cfg: ExperimentConfig, *, resume: bool = False) -> Report:
    s = cfg.study
    if not s.pretrain_sites:
        raise ConfigError(
            "study.pretrain_sites: name the unlabelled target-domain site YAMLs MoCo and SparK use"
        )
    if cfg.finetune.task != "dr":
        raise ConfigError(f"finetune.task: the study grades DR; set it to dr (got {cfg.finetune.task!r})")
    if not s.archs:
        raise ConfigError("study.archs: name at least one architecture (nnmobilenet, resnet50)")
    arms_csv = run_dir(cfg, PART) / "arms.csv"
    if arms_csv.exists() and not resume:
        raise CheckpointError(
            f"{arms_csv} exists: pass --resume to finish that study, or pick another --name"
        )
    for arch, weights in s.imagenet.items():  # before any pretraining or run folder
        if arch in s.archs:
            check_init("imagenet", weights, override(cfg, {"model.arch": arch, **s.archs[arch]}).model)
    cfg = cfg.model_copy(update={"study": s.model_copy(update={"compare_to": REFERENCE})})
    out = start_run_dir(cfg, PART)
    all_arms, all_diffs, starts, fractions = [], [], {}, {}
    for arch, changes in s.archs.items():
        acfg = override(cfg, {"model.arch": arch, **changes}, f"study.archs.{arch}")
        amounts = fractions[arch] = [Amount(fraction=f) for f in acfg.finetune.label_fractions]  # its own
        setups = _setups(acfg, arch, resume)
        starts[arch] = {name: setup.start for name, setup in setups.items()}
        inits = {name: setup.init for name, setup in setups.items()}
        acfg = acfg.model_copy(
            update={
                "finetune": acfg.finetune.model_copy(
                    update={"protocol": "cv", "inits": inits, "run_folds": 1}
                )
            }
        )
        cohort = cohort_of(acfg, s.external_sites)
        arch_out = out / arch
        metrics = study_metrics(acfg, logit_referable=True)
        arms = run_arms(acfg, cohort, inits, amounts, arch_out, resume=resume)
        arms = arm_metrics(arms, arch_out, metrics, list(SPLITS))
        splits = [split for split in SPLITS if (arms["split"] == split).any()]
        diffs = pd.concat(
            [differences(acfg, arch_out, list(inits), amounts, metrics, split) for split in splits]
            + [_cl_minus_fs(acfg, arch_out, amounts, metrics, split) for split in splits]
        )
        all_arms.append(arms.assign(arch=arch))
        all_diffs.append(diffs.assign(arch=arch))
        for split in splits:
            metric_vs_labels(
                out / f"auc_vs_fraction_{arch}_{split}.png",
                arms[arms["split"] == split],
                "referable_auc",
                title=f"{arch}: referable DR AUC ({split})",
            )
    arms, diffs = pd.concat(all_arms, ignore_index=True), pd.concat(all_diffs, ignore_index=True)
    table = _table(arms, diffs, starts, fractions, cfg)
    atomic_write_text(out / "arms.csv", arms.to_csv(index=False))
    atomic_write_text(out / "differences.csv", diffs.to_csv(index=False))
    atomic_write_text(out / "table.md", table)
    summary = {"starts": starts, "differences": diffs.to_dict("records")}
    atomic_write_text(out / "summary.json", json.dumps(no_nan(summary), indent=2))
    return Report(out, table)


def _setups(cfg: ExperimentConfig, arch: str, resume: bool) -> dict[str, Setup]:
    """The five encoder starts for `arch`, pretraining (or reusing) each that needs it."""
    pool = f"MoCo v2 on {_sites(cfg.study.pretrain_sites)}"
    imagenet = cfg.study.imagenet.get(arch)
    if imagenet:
        ifi = Setup(
            InitConfig(kind="imagenet", weights=imagenet), f"ImageNet weights ({Path(imagenet).name})"
        )
    else:
        natural = _pretrained(cfg, arch, "natural", InitConfig(), resume)
        ifi = Setup(InitConfig(kind="natural", weights=str(natural)), NATURAL_SOURCE)
    moco = _pretrained(cfg, arch, "moco", InitConfig(), resume)
    moco_ifi = _pretrained(cfg, arch, "moco-ifi", ifi.init, resume)
    spark = _pretrained(cfg, arch, "spark", InitConfig(), resume)
    return {
        REFERENCE: Setup(InitConfig(), "random"),
        "IWNE-CL": Setup(InitConfig(kind="moco", weights=str(moco)), f"{pool}, from random"),
        "IFI-FS": ifi,
        "IFI-CL": Setup(InitConfig(kind="moco", weights=str(moco_ifi)), f"{pool}, from {ifi.start}"),
        "SparK": Setup(
            InitConfig(kind="spark", weights=str(spark)), f"SparK on {_sites(cfg.study.pretrain_sites)}"
        ),
    }


def _pretrained(cfg: ExperimentConfig, arch: str, setup: str, start: InitConfig, resume: bool) -> Path:
    """The encoder of runs/NAME/seed2/<arch>/<setup>/pretrain/: trained unless finished (continued on
    --resume). `setup` is natural, moco, moco-ifi or spark; moco-ifi starts from `start`. The method's
    `study.pretraining` overrides apply, then the architecture's (`study.archs`), which win."""
    method = setup.removesuffix("-ifi")
    changes = {**cfg.study.pretraining.get(method, {}), **cfg.study.archs[arch]}
    pre = override(cfg, changes, f"study.pretraining.{method} / study.archs.{arch}")
    pre = pre.model_copy(
        update={
            "name": f"{cfg.name}/{PART}/{arch}/{setup}",
            "sites": () if method == "natural" else cfg.study.pretrain_sites,
            "pretrain": pre.pretrain.model_copy(update={"method": method, "init": start, "export_every": 0}),
        }
    )
    encoder = run_dir(pre, "pretrain") / "encoder.safetensors"
    if encoder.exists():
        log.info("%s %s encoder already pretrained: %s", arch, setup, encoder)
        return encoder
    log.info("pretraining the %s %s encoder", arch, setup)
    return run_pretraining(pre, resume=resume).encoder


def _table(
    arms: pd.DataFrame,
    diffs: pd.DataFrame,
    starts: dict[str, dict[str, str]],
    fractions: dict[str, list[Amount]],
    cfg: ExperimentConfig,
) -> str:
    threshold = cfg.finetune.referable_threshold
    lines = [
        "# The second seed's study",
        "",
        f"Referable DR = grade >= {threshold}, read two ways: "
        + "; ".join(f"`{k}` = {NAMES[k]}" for k in SHOWN[:2])
        + f". Means ± std over {len(cfg.study.seeds)} seed(s); label fractions of the development patients.",
    ]
    for arch, setups in starts.items():
        lines += ["", f"## {arch}", "", "| setup | encoder start |", "|---|---|"]
        lines += [f"| {name} | {start} |" for name, start in setups.items()]
        for split in SPLITS:
            rows = arms[(arms["arch"] == arch) & (arms["split"] == split)]
            if rows.empty:
                continue
            d = diffs[(diffs["arch"] == arch) & (diffs["split"] == split)]
            lines += ["", f"### {split} split", "", *means_table(rows, fractions[arch], list(SHOWN), split)]
            lines += [
                "",
                "Paired differences (mean over seeds; 95% bootstrap CI over the images):",
                "",
                *differences_table(d, fractions[arch], list(SHOWN)),
            ]
    return "\n".join(lines) + "\n"


def _cl_minus_fs(
    cfg: ExperimentConfig, out: Path, amounts: list[Amount], metrics: dict[str, Metric], split: str
) -> pd.DataFrame:
    """IFI-CL minus IFI-FS, the paper's second "CL minus FS" (IWNE-CL's is among those versus IWNE-FS)."""
    versus_ifi = cfg.model_copy(update={"study": cfg.study.model_copy(update={"compare_to": "IFI-FS"})})
    return differences(versus_ifi, out, ["IFI-FS", "IFI-CL"], amounts, metrics, split)


def _sites(paths: tuple[str, ...]) -> str:
    return "+".join(Path(p).stem for p in paths)
