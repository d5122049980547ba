"""The one typed experiment configuration, its tiny/cpu/paper profiles, and strict YAML loading.

A configuration is built in three layers, later ones winning: the profile's YAML
(`shared/profiles/<profile>.yaml`), the user's experiment YAML, then dotted overrides from the command line
or Flower's run config (`pretrain.epochs=3`). The result is validated once, here; below this point code takes
the frozen `ExperimentConfig` (or plain arguments), never a raw dict.

Any problem (missing file, YAML syntax, unknown key, wrong type) raises `ConfigError` with one line naming the
file and the key, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import difflib
import math
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.errors import ConfigError
from shared.federation.strategies import STRATEGIES, strategy_of
from shared.names import check_run_name

PROFILES_DIR = Path(__file__).parent / "profiles"
PROFILES = ("tiny", "cpu", "paper")
MAX_YAML_BYTES = 1_000_000  # a site or experiment YAML is a page of keys; anything larger is not one

Model = TypeVar("Model", bound=BaseModel)


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors and values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Strict):
    # vit_*: a ViT/16 (timm's; RETFound is vit_large), pretrained by MAE only (shared/models/vit.py)
    arch: Literal["nnmobilenet", "resnet50", "vit_tiny", "vit_small", "vit_base", "vit_large"] = "nnmobilenet"
    # nn-MobileNet width multiplier: 3.0 is the paper's 30.9M-parameter encoder.
    width_mult: float = Field(3.0, gt=0)
    # "bn" = BatchNorm (SparK's sparse BN in pretraining); "gn" = per-sample masked GroupNorm (DP-ready).
    norm: Literal["bn", "gn"] = "bn"
    # nn-MobileNet's spatial dropout after every block (its CLI's drop_path; not stochastic depth).
    dropout2d: float = Field(0.0, ge=0, lt=1)
    head_dropout: float = Field(0.2, ge=0, lt=1)


class DataConfig(Strict):
    # Pretraining input side; a multiple of 32 (SparK's mask grid is image_size / 32).
    image_size: int = 224
    # Fine-tuning input side (the seed fine-tunes at 512 on the GPU); defaults to image_size when null.
    finetune_image_size: int | None = None
    # Keep decoded, fundus-cropped, resized images per site so CPU epochs are not dominated by JPEG decoding.
    cache: bool = True
    workers: int = Field(0, ge=0)

    @field_validator("image_size", "finetune_image_size")
    @classmethod
    def _multiple_of_32(cls, v: int | None) -> int | None:
        if v is not None and (v < 32 or v % 32):
            raise ValueError(f"must be a positive multiple of 32 (SparK's patch size), got {v}")
        return v


class InitConfig(Strict):
    """Where the encoder starts: random, one of our SparK / MoCo / natural-photo exports, or local ImageNet
    weights."""

    # mae: our MAE export, or a ViT-MAE checkpoint in RETFound's published format (a .pth state dict)
    kind: Literal["scratch", "spark", "moco", "natural", "imagenet", "mae"] = "scratch"
    weights: str | None = None  # a path (relative to the experiment YAML)

    @model_validator(mode="after")
    def _needs_weights(self) -> InitConfig:
        if self.kind != "scratch" and not self.weights:
            raise ValueError(f"init kind {self.kind!r} needs `weights:` (a local file path)")
        return self


class PretrainConfig(Strict):
    # "spark": masked image modelling (the first seed); "moco": MoCo v2 contrastive (the second seed);
    # "natural": supervised classification of scikit-image's natural photographs, the offline stand-in for
    # ImageNet weights (shared/data/photos.py); it reads no site. "mae": MAE (He et al. 2022) for a ViT
    # (model.arch: vit_*; shared/training/mae.py), the first seed's ViT baseline.
    method: Literal["spark", "moco", "natural", "mae"] = "spark"
    epochs: int = Field(1600, ge=1)
    batch_size: int = Field(64, ge=2)  # SE blocks hold BatchNorm on a (B, C, 1, 1) vector: B >= 2
    optimizer: Literal["lamb", "adamw"] = "lamb"
    # SparK's rule: lr = base_lr * batch_size / 256.
    base_lr: float = Field(2e-4, gt=0)
    warmup_epochs: float = Field(40, ge=0)
    weight_decay: float = Field(0.04, ge=0)
    weight_decay_end: float = Field(0.2, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = Field(5.0, gt=0)
    mask_ratio: float = Field(0.6, gt=0, lt=1)
    decoder_width: int = Field(768, ge=8)
    decoder_depth: int = Field(2, ge=1)  # MAE's transformer decoder blocks (SparK's decoder has its 5 scales)
    # "batch": SparK's mean over all masked patches of the batch; "sample": per-sample mean (needed under DP).
    loss_reduction: Literal["batch", "sample"] = "batch"
    preview_every: int = Field(1, ge=0)  # epochs between reconstruction PNGs; 0 = only at the end
    checkpoint_every: int = Field(1, ge=1)
    # Centralised: also export the encoder every N epochs (pretrain/encoders/epochN.safetensors), e.g. for
    # linear-probe curves over pretraining; 0 = only the final export.
    export_every: int = Field(0, ge=0)
    amp: bool = True  # bf16 autocast, used only on CUDA
    channels_last: bool = True  # used only on CUDA
    # Where the encoder starts (scratch; imagenet or an earlier export, e.g. MoCo from ImageNet weights).
    init: InitConfig = InitConfig()
    # MoCo v2 (Chen et al. 2020): 128-d projection, momentum key encoder, queue of negatives, temperature.
    moco_dim: int = Field(128, ge=8)
    moco_queue: int = Field(4096, ge=8)
    moco_momentum: float = Field(0.999, gt=0, lt=1)
    moco_temperature: float = Field(0.2, gt=0)
    natural_crops: int = Field(2048, ge=16)  # the photographs' random crops per epoch
    # What spark, moco and mae pretrain on: the sites' fundus images, or (photos) the natural photographs
    # `natural` classifies, as the non-retinal source of the first seed's domain-sensitivity question.
    # `natural` always reads the photographs.
    images: Literal["sites", "photos"] = "sites"


class FinetuneConfig(Strict):
    task: str = "dr"
    # "cv": the seeds' patient-grouped k-fold cross-validation, the best epoch selected on an inner split.
    # "holdout": the federation's protocol centralised: each site's development images split by patient into
    # train and validation as a federated site splits them, `epochs` epochs, the last epoch's model.
    protocol: Literal["cv", "holdout"] = "cv"
    # Setups to compare, by name; each runs every label fraction and fold into one table.
    inits: dict[str, InitConfig] = Field(default_factory=lambda: {"scratch": InitConfig()})
    # Validation metric that picks the best epoch (higher is better; "loss" is lower-better).
    select_metric: str = "auc"
    epochs: int = Field(100, ge=1)
    # Training length in optimiser steps instead (0 = `epochs`): an arm trains round(steps / its batches per
    # epoch) epochs (at least 1), so 50 labels train as long as 5,000 do.
    steps: int = Field(0, ge=0)
    batch_size: int = Field(32, ge=2)
    optimizer: Literal["adamw", "lamb", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    # Peak lr multiplier for an encoder that starts pretrained (spark, moco, imagenet): pretrained weights are
    # a solution to keep near, not noise to move away from.
    pretrained_lr_scale: float = Field(1.0, gt=0, le=1)
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    folds: int = Field(5, ge=2)
    # Folds actually run (1..folds); the seed runs all 5, quick looks run fewer.
    run_folds: int | None = Field(None, ge=1)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    # A validation split smaller than this never selects the epoch: the last one is kept instead.
    min_val_images: int = Field(0, ge=0)
    label_fractions: tuple[float, ...] = (1.0,)
    augment: Literal["heavy", "light", "none"] = "heavy"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    mixup: float = Field(0.0, ge=0)
    cutmix: float = Field(0.0, ge=0)
    # Layer-wise lr decay per encoder stage (training/finetune.py:STAGE_DEPTH); SparK's downstream uses 0.7.
    layer_decay: float = Field(1.0, gt=0, le=1)
    early_stopping: int = Field(0, ge=0)  # patience in epochs; 0 = off
    class_weighting: bool = False
    referable_threshold: int = Field(2, ge=1, le=4)
    bootstrap: int = Field(1000, ge=0)
    amp: bool = True  # bf16 autocast, used only on CUDA

    @field_validator("label_fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0 < f <= 1 for f in v):
            raise ValueError("every label fraction must lie in (0, 1]")
        return tuple(sorted(set(v), reverse=True))

    @model_validator(mode="after")
    def _run_folds_fit(self) -> FinetuneConfig:
        if self.run_folds is not None and self.run_folds > self.folds:
            raise ValueError(f"run_folds ({self.run_folds}) cannot exceed folds ({self.folds})")
        return self


class FederationConfig(Strict):
    # Tasks fine-tuned in phase 2 (one head each); empty = every task some site holds labels for.
    tasks: tuple[str, ...] = ()
    rounds_pretrain: int = Field(100, ge=0)
    rounds_finetune: int = Field(50, ge=0)
    # one of shared/federation/strategies.py's: fedavg, fedprox, fedbn, fedadam, fedavgm, mime, trimmed-mean,
    # cyclic
    strategy: str = "fedavg"
    local_epochs: int = Field(1, ge=1)
    # Local steps (batches) per round instead of epochs when > 0; sites continue their epochs across rounds.
    local_steps: int = Field(0, ge=0)
    # Phase 2's own local steps when they differ from phase 1's (None: local_steps; 0: local epochs), so
    # short pretraining rounds and epoch-long fine-tuning rounds can share a run (compare derives both).
    local_steps_finetune: int | None = Field(None, ge=0)
    proximal_mu: float = Field(0.01, ge=0)
    # Phase 2's encoder when phase 1 does not run (rounds_pretrain 0): a SparK or MoCo encoder export read
    # by the server; empty = a seeded random encoder.
    start_encoder: str = ""
    # The server's step along the round's average change: FedAdam's eta (default 0.01) or FedAvgM's server
    # lr (default 1.0, with server_momentum; docs/compare.md has the measurements that chose them).
    server_lr: float | None = Field(None, gt=0)
    server_momentum: float = Field(0.9, ge=0, lt=1)  # FedAvgM's beta (Hsu et al. 2019)
    # trimmed-mean: the share of sites' values dropped at each end, per coordinate (at least one is kept)
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)
    min_sites: int = Field(1, ge=1)
    # Fraction of the eligible sites that train (and evaluate) each round, drawn by seed per round; at least
    # min_sites. 1.0 = every site every round; national programmes with 100+ sites sample.
    participation: float = Field(1.0, gt=0, le=1)
    reply_timeout_s: float = Field(3600, gt=0)
    connect_deadline_s: float = Field(600, gt=0)
    # Deployment: sites each round waits for (up to connect_deadline_s) before going on with those there;
    # 0 = min_sites. `fedretina server run` sets it to the number of registered sites.
    expected_sites: int = Field(0, ge=0)
    max_update_norm: float = Field(1e4, gt=0)
    # A round with fewer than min_sites accepted updates: "skip" keeps the model and goes on; "wait" waits
    # for sites (up to connect_deadline_s) and tries the round again, failing the run (resumable) after
    # round_attempts tries.
    short_round: Literal["skip", "wait"] = "skip"
    round_attempts: int = Field(3, ge=1)
    keep_optimizer_state: bool = True  # persist each site's optimiser state across rounds (its state dir)
    # cyclic only: the optimiser's moments travel with the model from site to site (3x the bytes), so the
    # chain's optimiser steps continue one another as a centralised run's do (docs/compare.md)
    carry_optimizer: bool = False
    keep_checkpoints: int = Field(3, ge=1)  # server checkpoints kept per phase (the phase's last always)
    # SecAgg+ (docs/secure-aggregation.md): the server sees only the sum of the sites' weighted changes, not
    # any one site's. Each entry a site sends must lie within +/- secagg_clipping_range (a site whose update
    # would not refuses the round); the sum's resolution is 2 x secagg_clipping_range / 2^22.
    secure_aggregation: bool = False
    secagg_clipping_range: float = Field(8.0, ge=1)  # >= 1: a site's weight entry is up to 1
    # Share of a site's neighbours whose key shares rebuild its masks when it drops out mid-round.
    secagg_threshold: float = Field(0.66, gt=0, le=1)
    # After phase 2, each site also scores every other site's last local model (its weights of the last
    # round) on its own test patients: the cross-site table (how a model trained without a site does on
    # it). It shows each site's update to the others, so not under secure aggregation.
    cross_site: bool = False

    @field_validator("strategy")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r}; known strategies: {', '.join(STRATEGIES)}")
        return v

    def steps_in(self, phase: str) -> int:
        """Local steps per round in `phase` ("pretrain" or "finetune"); 0: `local_epochs` per round."""
        if phase == "finetune" and self.local_steps_finetune is not None:
            return self.local_steps_finetune
        return self.local_steps

    def local_work(self, phase: str) -> str:
        """A round's work at a site in `phase`, in words: "9 local steps", "1 local epoch"."""
        n, noun = (
            (self.steps_in(phase), "local step")
            if self.steps_in(phase)
            else (self.local_epochs, "local epoch")
        )
        return f"{n} {noun}{'s' * (n != 1)}"

    @model_validator(mode="after")
    def _strategy_settings(self) -> FederationConfig:
        for key, why in strategy_of(self.strategy).problems(self, private=False):
            raise ValueError(f"{key}: {why}")
        if self.cross_site and self.secure_aggregation:
            raise ValueError(
                "cross_site: it sends each site's own model to the others, which secure aggregation hides; "
                "set one of them to false"
            )
        if self.cross_site and strategy_of(self.strategy).sequential:
            raise ValueError(
                f"cross_site: strategy {self.strategy} chains the sites, so no model is one site's own; "
                "use a parallel strategy"
            )
        return self


class Budget(Strict):
    """A data holder's privacy budget: (target_epsilon, delta) over everything it ever releases. A site's
    own YAML sets it (`privacy:`); centralised runs take the experiment's `privacy.target_epsilon/delta`."""

    target_epsilon: float = Field(8.0, gt=0)
    # The chance the guarantee fails; keep it below 1 / (the holder's patients).
    delta: float = Field(1e-5, gt=0, lt=1)


class PrivacyConfig(Budget):
    """DP-SGD at every data holder (Opacus), off by default."""

    enabled: bool = False
    # What epsilon protects: a "patient" (all their images: both eyes, every visit) or one "image".
    unit: Literal["patient", "image"] = "patient"
    clip: float = Field(1.0, gt=0)  # bound on one unit's gradient (L2), before noise
    # Noise multiplier sigma; null = each data holder picks the smallest that keeps its whole plan
    # (every round of both phases, after what it already spent) within its budget.
    noise_multiplier: float | None = Field(None, ge=0)
    grad_sample_mode: Literal["functorch", "hooks"] = "functorch"  # functorch is faster for depthwise CNNs


# Settings DP-SGD cannot honour, with why: refused in one line when privacy.enabled is true.
DP_REFUSED = (
    (
        "model.norm",
        lambda c: c.model.norm == "bn",
        "BatchNorm mixes the images of a batch; set model.norm=gn",
    ),
    (
        "pretrain.method",
        lambda c: c.pretrain.method == "moco",
        "MoCo's queue of keys carries other images into each image's loss; use spark",
    ),
    (
        "pretrain.method",
        lambda c: c.pretrain.method == "natural",
        "the natural photographs are public: pretrain on them without DP (privacy.enabled=false)",
    ),
    (
        "pretrain.images",
        lambda c: c.pretrain.images == "photos",
        "the natural photographs are public: pretrain on them without DP (privacy.enabled=false)",
    ),
    (
        "pretrain.loss_reduction",
        lambda c: c.pretrain.loss_reduction == "batch",
        "the batch-wide mean couples images; set pretrain.loss_reduction=sample",
    ),
    ("finetune.mixup", lambda c: c.finetune.mixup > 0, "mixup blends images of a batch; set it to 0"),
    ("finetune.cutmix", lambda c: c.finetune.cutmix > 0, "cutmix blends images of a batch; set it to 0"),
    (
        "finetune.class_weighting",
        lambda c: c.finetune.class_weighting,
        "weights from the private label counts are not privatised; set it to false",
    ),
)


class StudyConfig(Strict):
    """The `fedretina study` commands. `pretraining`: SparK on unlabelled sites, then {scratch, spark, ...} x
    label counts x seeds fine-tuned on the labelled `sites`, paired, scored on their own test split.
    `seed2`: the second seed's four setups and SparK, per architecture, x `finetune.label_fractions` x seeds,
    scored on the test split and on `external_sites`."""

    # site YAMLs SparK (and, in seed2, MoCo) pretrains on (relative to the experiment YAML)
    pretrain_sites: tuple[str, ...] = ()
    label_counts: tuple[int, ...] = (50, 200, 0)  # labelled images per arm, train + validation; 0 = all
    seeds: tuple[int, ...] = (0, 1, 2)
    # pretraining: SparK once per seed (init `spark-seed<k>`, runs/NAME/spark-seed<k>/pretrain/), so the
    # encoder's own variance counts; empty: once with the experiment's seed (`spark`, runs/NAME/pretrain/)
    pretrain_seeds: tuple[int, ...] = ()
    probe_every: int = Field(2, ge=1)  # pretraining epochs between the probe curve's encoder snapshots
    # Further encoder exports to compare like `spark` (e.g. a federated SparK run's encoder.safetensors).
    encoders: dict[str, str] = Field(default_factory=dict)
    # pretraining: federated SparK arms, name -> dotted overrides of a `flwr run .` simulation over
    # `pretrain_sites` (one simulated site each), once per pretraining seed at the centralised run's
    # sample-gradients, e.g. {spark-fedavg: {federation.rounds_pretrain: 48}}; each is paired with the
    # centralised SparK of its seed (simulation/studies/federated_spark.py)
    federated: dict[str, dict[str, Any]] = Field(default_factory=dict)
    compare_to: str = "scratch"  # the init every difference is taken against
    # seed2: labelled sites scored only (a Messidor-2-like external test), never trained on
    external_sites: tuple[str, ...] = ()
    # pretraining: held-out sites of the labelled sites' population (e.g. the synth plan eyepacs-test) whose
    # test splits join the test split every arm is scored on, so its intervals narrow; never trained on
    test_sites: tuple[str, ...] = ()
    # seed2: the architectures, each with its dotted overrides (e.g. resnet50: {data.image_size: 96})
    archs: dict[Literal["nnmobilenet", "resnet50"], dict[str, Any]] = Field(
        default_factory=lambda: {"nnmobilenet": {}, "resnet50": {}}
    )
    # seed2: dotted overrides per pretraining method (spark, moco, natural), e.g. {moco: {pretrain.epochs: 8}}
    pretraining: dict[Literal["spark", "moco", "natural"], dict[str, Any]] = Field(default_factory=dict)
    # seed2: local ImageNet weights per architecture; an architecture without one starts its IFI setups from
    # the natural-photo stand-in (shared/data/photos.py), named as such in every table
    imagenet: dict[Literal["nnmobilenet", "resnet50"], str] = Field(default_factory=dict)

    @field_validator("label_counts")
    @classmethod
    def _counts(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(c < 0 for c in v):
            raise ValueError("label counts are image counts >= 0 (0 = all)")
        return tuple(sorted(set(v), key=lambda c: c or math.inf))


class CompareConfig(Strict):
    """`fedretina compare`: centralised (pooled), each site alone (local) and federated strategies, per
    scenario and seed, at equal sample-gradient steps (docs/compare.md)."""

    # arm name -> dotted overrides of the federated arm (e.g. fedbn: {federation.strategy: fedbn})
    strategies: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"fedavg": {"federation.strategy": "fedavg"}}
    )
    # scenario (a name in simulation/scenarios/ or a YAML path) -> its strategies (empty: all of them)
    scenarios: dict[str, tuple[str, ...]] = Field(default_factory=lambda: {"iid-4": ()})
    local: bool = True  # also train each site alone, on its own images
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    # both phases (SparK pretraining, federated in federated arms, then fine-tuning); false: fine-tuning
    # only, from `encoder` (an encoder export) or, empty, from random weights
    pretrain: bool = False
    encoder: str = ""
    # site YAMLs whose test images every arm is scored on too, beside the scenario sites' own: held-out
    # patients of the same population, for intervals narrow enough to decide (sites/generated/
    # eyepacs-test.yaml: 998 test images, `fedretina synth --profile cpu --only eyepacs-test`)
    test_sites: tuple[str, ...] = ()
    metric: Literal["referable_auc", "kappa", "auc"] = "referable_auc"  # the verdict's metric
    margin: float = Field(0.02, gt=0)  # federated may lose at most this much of it to be non-inferior

    @model_validator(mode="after")
    def _known_strategies(self) -> CompareConfig:
        for scenario, names in self.scenarios.items():
            if unknown := sorted(set(names) - set(self.strategies)):
                raise ValueError(
                    f"scenarios.{scenario}: strategies {unknown} are not defined under compare.strategies"
                )
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        return self


class TrackingConfig(Strict):
    """Where a federated run's record is mirrored for the research group (docs/dashboard.md, "MLflow"): the
    server logs its parameters, per-round metrics (global and per site), the final test and the model; the
    sites send nothing new."""

    # MLflow tracking URI: http(s)://host:port (a tracking server), sqlite:////abs/path.db, or a bare file
    # name (a SQLite database under runs_dir, e.g. mlflow.db); empty: off. Credentials go in
    # MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, never in the URI (it is stored with the run).
    mlflow_uri: str = ""
    experiment: str = Field("fedretina", min_length=1, max_length=200)

    @field_validator("mlflow_uri")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        if "@" in v.split("/")[2 if "://" in v else 0]:
            raise ValueError(
                "the URI carries credentials; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                "instead"
            )
        return v


class ExperimentConfig(Strict):
    name: str = "run"
    profile: Literal["tiny", "cpu", "paper"] = "cpu"
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # CPU threads for torch (0 = torch's default; Flower's Ray actors default to one per CPU they hold).
    # Bitwise reproduction across processes needs the same number: float sums depend on it.
    threads: int = Field(0, ge=0)
    runs_dir: str = "runs"
    sites: tuple[str, ...] = ()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    federation: FederationConfig = FederationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    study: StudyConfig = StudyConfig()
    compare: CompareConfig = CompareConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_run_name(v)  # it names folders (runs/<name>/), here and in every file of the run

    @model_validator(mode="after")
    def _private_settings(self) -> ExperimentConfig:
        if self.privacy.enabled:
            for key, refused, why in DP_REFUSED:
                if refused(self):
                    raise ValueError(f"{key} is refused under privacy.enabled=true: {why}")
            for key, why in strategy_of(self.federation.strategy).problems(self.federation, private=True):
                raise ValueError(f"federation.{key} is refused under privacy.enabled=true: {why}")
        return self

    @model_validator(mode="after")
    def _server_moments(self) -> ExperimentConfig:
        if strategy_of(self.federation.strategy).server_moments and self.finetune.optimizer == "sgd":
            raise ValueError(
                f"finetune.optimizer: strategy {self.federation.strategy} hands the server's Adam moments to "
                "the sites; choose adamw or lamb"
            )
        return self

    @property
    def finetune_image_size(self) -> int:
        return self.data.finetune_image_size or self.data.image_size


# Settings that change how a run is carried out, not what it computes: free to differ when a run continues.
OPERATIONAL = (
    "name",
    "runs_dir",
    "device",
    "threads",
    "deterministic",
    "data.workers",
    "data.cache",
    "pretrain.preview_every",
    "pretrain.checkpoint_every",
    "federation.min_sites",
    "federation.reply_timeout_s",
    "federation.connect_deadline_s",
    "federation.expected_sites",
    "federation.keep_checkpoints",
)


def shaping_settings(cfg: ExperimentConfig, free: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every setting that shapes a run's result, as dotted keys (`federation.rounds_pretrain`): the whole
    resolved config but the operational keys and those under the prefixes in `free`."""
    return without(flatten(cfg.model_dump(mode="json")), OPERATIONAL + free)


def without(settings: Mapping[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """`settings` less every dotted key equal to or under one of `prefixes`."""
    return {k: v for k, v in settings.items() if not any(k == p or k.startswith(f"{p}.") for p in prefixes)}


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys; lists and scalars are values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


class _NoAliases(yaml.SafeLoader):
    """YAML's safe loader without anchors and aliases: a config never needs them, and aliases nest into
    billions of values ("billion laughs") that validation would walk."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases (*name) are not allowed in a config; write the values out")
        return super().compose_node(parent, index)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, a syntax error or a non-mapping is a one-line `ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes; a config is at most {MAX_YAML_BYTES} bytes")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_NoAliases)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def validate(model: type[Model], data: Mapping[str, Any], source: str) -> Model:
    """Build `model` from `data`, turning the first validation problem into one line naming the key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, model, source)) from None


def load_config(
    path: str | Path | None = None,
    *,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ExperimentConfig:
    """Resolve profile, experiment YAML and dotted overrides into one validated `ExperimentConfig`.

    The profile comes from `profile` if given, else from the YAML's `profile:` key, else "cpu".
    """
    user = read_yaml(path) if path else {}
    source = str(path) if path else "config"
    name = profile or user.get("profile") or "cpu"
    if name not in PROFILES:
        raise ConfigError(f"{source}: profile: unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    if path:
        _resolve_paths(user, Path(path).parent)
    merged = deep_merge(read_yaml(PROFILES_DIR / f"{name}.yaml"), user)
    merged["profile"] = name
    for key, value in (overrides or {}).items():
        set_dotted(merged, key, value, source)
    return validate(ExperimentConfig, merged, source)


def _resolve_paths(user: dict[str, Any], base: Path) -> None:
    """Paths in an experiment YAML (sites, weights of initialisations, the study's sites and encoders) are
    relative to the YAML's folder."""
    if isinstance(user.get("sites"), list):
        user["sites"] = [str((base / s).resolve()) for s in user["sites"]]
    finetune, pretrain = user.get("finetune"), user.get("pretrain")
    specs = list((finetune.get("inits") or {}).values()) if isinstance(finetune, dict) else []
    specs += (
        [pretrain["init"]] if isinstance(pretrain, dict) and isinstance(pretrain.get("init"), dict) else []
    )
    for spec in specs:
        if isinstance(spec, dict) and isinstance(spec.get("weights"), str):
            spec["weights"] = str((base / spec["weights"]).resolve())
    study = user.get("study")
    if isinstance(study, dict):
        for key in ("pretrain_sites", "external_sites", "test_sites"):
            if isinstance(study.get(key), list):
                study[key] = [str((base / s).resolve()) for s in study[key]]
        for key in ("encoders", "imagenet"):
            if isinstance(study.get(key), dict):
                study[key] = {k: str((base / v).resolve()) for k, v in study[key].items()}


def override(
    cfg: ExperimentConfig, overrides: Mapping[str, Any], source: str = "override"
) -> ExperimentConfig:
    """`cfg` with dotted overrides applied (`{"model.arch": "resnet50"}`), validated again as a whole."""
    data = cfg.model_dump(mode="json")
    for key, value in overrides.items():
        set_dotted(data, key, value, source)
    return validate(ExperimentConfig, data, source)


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings merge key by key, anything else in `over` replaces `base`."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any, source: str = "override") -> None:
    """Set `a.b.c = value` in nested dicts, creating levels; validation catches unknown keys later."""
    *parents, leaf = dotted.replace("-", "_").split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {dotted}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse `key=value` strings from the command line; values are YAML scalars (`3`, `true`, `[1, 0.1]`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. pretrain.epochs=3")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: value is not a YAML scalar or list") from None
    return out


def dump_config(config: BaseModel) -> str:
    """The resolved configuration as YAML, for the run directory (tuples become lists)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _one_line(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if err["type"] == "extra_forbidden":
        known = _known_keys(model, err["loc"][:-1])
        hint = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        fix = f"did you mean {hint[0]!r}?" if hint else f"known keys here: {', '.join(sorted(known))}"
        return f"{source}: {loc}: unknown key; {fix}{more}"
    got = err.get("input")
    shown = err["type"] != "value_error" and not isinstance(got, dict | list)
    got_txt = f", got {got!r}" if shown else ""
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a check across sections names its own key
        return f"{source}: {msg}{more}"
    return f"{source}: {loc}: {msg[0].lower()}{msg[1:]}{got_txt}{more}"


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section at `loc`, to suggest the key that was meant."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


class RunOptions(Strict):
    """What a federated run needs beyond the experiment config, from Flower's run config."""

    scenario: str  # simulation: scenario name or YAML; "" = deployment (site from each node's config)
    run_name: str
    resume: bool


# The run config's keys; their one set of defaults is the app's pyproject.toml ([tool.flwr.app.config]),
# which Flower always sends whole.
RUN_CONFIG_KEYS = ("config", "profile", "scenario", "run-name", "seed", "resume", "set")


def from_run_config(run_config: Mapping[str, Any]) -> tuple[ExperimentConfig, RunOptions]:
    """Flower's run config (kebab-case, scalars only) -> (ExperimentConfig, RunOptions).

    `config` names an experiment YAML, `profile` its base profile, and `set` carries any other key as
    space-separated `key=value` overrides (`set = "federation.rounds_pretrain=2 model.width_mult=0.5"`),
    since a run config holds no lists or tables.
    """
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    missing = [k for k in RUN_CONFIG_KEYS if k not in run_config]
    if unknown or missing:
        raise ConfigError(
            f"run config: {f'unknown keys {unknown}' if unknown else f'missing keys {missing}'}; the app's "
            f"pyproject.toml [tool.flwr.app.config] defines {list(RUN_CONFIG_KEYS)}"
        )
    name, seed = str(run_config["run-name"]), int(run_config["seed"])
    overrides: dict[str, Any] = {"name": name} | ({"seed": seed} if seed >= 0 else {})
    overrides |= parse_overrides(shlex.split(str(run_config["set"])))  # applied last: it wins
    cfg = load_config(
        str(run_config["config"]) or None, profile=str(run_config["profile"]) or None, overrides=overrides
    )
    options = RunOptions(
        scenario=str(run_config["scenario"]), run_name=name, resume=bool(run_config["resume"])
    )
    return cfg, options
