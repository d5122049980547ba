"""Fine-tuning: the task model, its optimiser (with layer-wise lr decay), the method `run_phase` trains,
prediction, and a federated site's split of its images.

The same `classifier_method` and `predict` serve `fedretina finetune` (cross-validation or hold-out) and
federated phase 2.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from shared.config import ExperimentConfig
from shared.data.dataset import loader
from shared.data.labels import label_column
from shared.data.manifest import labelled
from shared.data.site import Site
from shared.data.splits import inner_split
from shared.device import autocast
from shared.errors import DataError
from shared.metrics import evaluate_predictions, metric_keys
from shared.models import TaskModel, build_encoder, min_batch
from shared.models.nnmobilenet import LAYERS
from shared.models.vit import VIT_SIZES
from shared.seeding import derive_seed
from shared.training.data import site_images
from shared.training.optim import Schedule, make_optimizer, optimizer_for, param_groups
from shared.training.phase import Method

PHASE = "finetune"
log = logging.getLogger(__name__)


def build_task_model(cfg: ExperimentConfig, tasks: dict[str, int]) -> TaskModel:
    return TaskModel(build_encoder(cfg.model), tasks, cfg.model.head_dropout)


# Layer-wise lr decay groups parameters by STAGE, as SparK's downstream code does for CNNs: one id per
# resolution stage, not per block (nn-MobileNet has 23 feature entries: decay 0.7 per entry would leave the
# stem at 0.7^23 = 3e-4, frozen). nn-MobileNet: stem 0, its six block stages 1-6 (the 1x1 pen conv joins the
# last), heads 7; ResNet50: stem 0, layer1-4 1-4, heads 5. The lr multiplier of id i is decay^(depth - i).
# A ViT as BEiT and MAE decay it: embeddings 0, block i i + 1, the final norm and the heads depth + 1.
STAGE_DEPTH = {"nnmobilenet": len(LAYERS) + 1, "resnet50": 5} | {
    arch: depth + 1 for arch, (_, depth, _) in VIT_SIZES.items()
}
_BLOCK_STAGE = [k + 1 for k, n in enumerate(LAYERS) for _ in range(n)]  # block j -> its stage id
_FIRST_BLOCK = 3  # nn-MobileNet's features: stem conv, norm, activation, then the blocks


def layer_id(name: str, arch: str) -> int:
    """Stage id of a parameter for layer-wise lr decay (see STAGE_DEPTH)."""
    depth = STAGE_DEPTH[arch]
    if name.startswith("heads."):
        return depth
    if m := re.match(r"encoder\.features\.(\d+)\.", name):
        block = int(m.group(1)) - _FIRST_BLOCK
        return 0 if block < 0 else _BLOCK_STAGE[min(block, len(_BLOCK_STAGE) - 1)]
    if m := re.match(r"encoder\.layer(\d)\.", name):
        return int(m.group(1))
    if m := re.match(r"encoder\.blocks\.(\d+)\.", name):
        return int(m.group(1)) + 1
    if name.startswith("encoder.norm.") and arch in VIT_SIZES:
        return depth
    return 0


def finetune_optimizer(model: TaskModel, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    f = cfg.finetune
    if f.layer_decay >= 1.0:
        return make_optimizer(model, f.optimizer, f.lr, f.weight_decay, (0.9, 0.999), 5.0)
    arch = cfg.model.arch
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for group in param_groups(model, f.weight_decay):
        by_stage: dict[int, list] = {}
        for p in group["params"]:
            by_stage.setdefault(layer_id(names[id(p)], arch), []).append(p)
        for sid, params in sorted(by_stage.items()):
            scale = f.layer_decay ** (STAGE_DEPTH[arch] - sid)
            groups.append({**group, "params": params, "lr_scale": scale})
    return optimizer_for(groups, f.optimizer, f.lr, (0.9, 0.999), 5.0)


def finetune_schedule(
    cfg: ExperimentConfig, steps_per_epoch: int, total_steps: int, pretrained: bool = False
) -> Schedule:
    """Warm-up in epochs of `steps_per_epoch`, then cosine down to min_lr at the end of `total_steps`; the
    peak is `lr`, times `pretrained_lr_scale` for a pretrained encoder."""
    f = cfg.finetune
    peak = f.lr * (f.pretrained_lr_scale if pretrained else 1.0)
    warmup = round(f.warmup_epochs * steps_per_epoch)
    return Schedule(
        peak,
        max(total_steps, 1),
        warmup,
        f.weight_decay,
        f.weight_decay,
        start_ratio=0.0,
        end_ratio=min(f.min_lr / peak, 1.0),
    )


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1 (classes absent from the data get weight 1)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 1.0)
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def classifier_method(
    model: TaskModel,
    cfg: ExperimentConfig,
    device: torch.device,
    weights: dict[str, torch.Tensor] | None = None,
    *,
    pretrained: bool = False,
) -> Method:
    """Cross-entropy of a task's head (label smoothing, mixup / CutMix, optional class weights per task);
    `pretrained`: the encoder starts from pretrained weights (the lower peak lr)."""
    f = cfg.finetune

    def loss(
        batch: dict[str, torch.Tensor], g: torch.Generator, task: str
    ) -> tuple[torch.Tensor, int] | None:
        images, labels = batch["image"].to(device), batch["label"].to(device)
        if images.shape[0] < min_batch(cfg.model):
            return None
        classes = model.heads[task][1].out_channels
        targets = F.one_hot(labels, classes).float()
        targets = targets * (1 - f.label_smoothing) + f.label_smoothing / classes
        images, targets = _mix(images, targets, f.mixup, f.cutmix, g)
        with autocast(device, f.amp):
            logits = model(images, task)
        per_sample = -(targets * F.log_softmax(logits.float(), dim=1))
        if weights is not None and task in weights:
            per_sample = per_sample * weights[task].to(device)[None, :]
        return per_sample.sum(1).mean(), images.shape[0]

    return Method(
        streams=PHASE,
        model=model,
        batch_size=f.batch_size,
        loss=loss,
        optimizer=lambda: finetune_optimizer(model, cfg),
        schedule=lambda per_epoch, total: finetune_schedule(cfg, per_epoch, total, pretrained),
    )


def task_weights(
    rows: dict[str, pd.DataFrame], classes: dict[str, int], cfg: ExperimentConfig
) -> dict[str, torch.Tensor] | None:
    """Each task's inverse-frequency class weights from its training rows, when `class_weighting` is on."""
    if not cfg.finetune.class_weighting:
        return None
    return {t: class_weights(r[label_column(t)].to_numpy(int), classes[t]) for t, r in rows.items()}


def predict(
    model: TaskModel,
    dataset: Dataset,
    task: str,
    device: torch.device,
    batch_size: int = 32,
    workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), class probabilities (N, K)) in dataset order, eval mode, no augmentation."""
    labels, logits = predict_logits(model, dataset, task, device, batch_size, workers)
    return labels, softmax(logits)


@torch.no_grad()
def predict_logits(
    model: TaskModel,
    dataset: Dataset,
    task: str,
    device: torch.device,
    batch_size: int = 32,
    workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), the head's logits (N, K) as float64) in dataset order, eval mode, no augmentation."""
    model.eval()
    labels, logits = [], []
    for batch in loader(dataset, batch_size, seed=None, train=False, workers=workers):
        logits.append(model(batch["image"].to(device), task).double().cpu())
        labels.append(batch["label"])
    return torch.cat(labels).numpy(), torch.cat(logits).numpy()


def predict_rows(
    model: TaskModel, site: Site, cfg: ExperimentConfig, task: str, rows: pd.DataFrame, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, class probabilities) of `model` on these of the site's images, unaugmented, in row order."""
    images = site_images(site, cfg, cfg.finetune_image_size, "none", rows=rows, task=task)
    return predict(model, images, task, device, cfg.finetune.batch_size)


def score_rows(
    model: TaskModel, site: Site, cfg: ExperimentConfig, task: str, rows: pd.DataFrame, device: torch.device
) -> dict[str, float]:
    """Every metric of `task` (`metric_keys`) for `model` on these of the site's images (NaN for each when
    there are none): a round's validation."""
    if not len(rows):
        return dict.fromkeys(metric_keys(task), float("nan"))
    y, p = predict_rows(model, site, cfg, task, rows, device)
    return evaluate_predictions(y, p, task, referable_threshold=cfg.finetune.referable_threshold)


def site_test_rows(site: Site, task: str) -> pd.DataFrame:
    """The site's labelled test images of `task` (its `test` split, which no training ever reads), in
    image-id order."""
    rows = labelled(site.rows, task)
    return rows[rows["split"] == "test"].sort_values("image_id").reset_index(drop=True)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities (N, K) in float64 from logits, rows summing to 1 (as sklearn wants)."""
    return torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float64)), dim=1).numpy()


BN_SETTLED = 50  # steps after which BatchNorm running statistics (momentum 0.1) keep < 1% of their start


@torch.no_grad()
def reestimate_batchnorm(
    model: TaskModel, dataset: Dataset, device: torch.device, batch_size: int, batches: int = 20
) -> None:
    """Replace every BatchNorm's running statistics by their plain average over up to `batches` batches of
    `dataset`. A model that trained few steps still carries its start's statistics (a SparK encoder's come
    from masked, sparse features): evaluation would normalise with the wrong ones."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for k, batch in enumerate(loader(dataset, batch_size, seed=None, train=False)):
        if k == batches:
            break
        model.encoder.forward_features(batch["image"].to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def _mix(
    images: torch.Tensor, targets: torch.Tensor, mixup: float, cutmix: float, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix (half the batches each when both are on), with a Beta(alpha, alpha) mixing ratio."""
    if mixup <= 0 and cutmix <= 0:
        return images, targets
    use_cutmix = cutmix > 0 and (mixup <= 0 or float(torch.rand((), generator=g)) < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = _beta(alpha, g)
    perm = torch.randperm(images.shape[0], generator=g).to(images.device)
    if use_cutmix:
        h, w = images.shape[-2:]
        ch, cw = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
        cy, cx = int(torch.randint(0, h, (), generator=g)), int(torch.randint(0, w, (), generator=g))
        y0, y1, x0, x1 = (
            max(cy - ch // 2, 0),
            min(cy + ch // 2, h),
            max(cx - cw // 2, 0),
            min(cx + cw // 2, w),
        )
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = images[perm, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        images = lam * images + (1 - lam) * images[perm]
    return images, lam * targets + (1 - lam) * targets[perm]


def _beta(alpha: float, g: torch.Generator) -> float:
    """Beta(alpha, alpha), seeded from `g` (torch's Beta distribution takes no generator)."""
    return float(np.random.default_rng(int(torch.randint(0, 2**31, (), generator=g))).beta(alpha, alpha))


def finetune_split(rows: pd.DataFrame, task: str, cfg: ExperimentConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A federated site's (train, validation) images for `task`: its labelled development images split by
    patient; its test split (if any) is left out. Pooling per-site splits gives the centralised reference
    exactly the same images."""
    column = label_column(task)
    dev = labelled(rows, task)
    dev = dev[dev["split"] != "test"]
    try:
        train, val = inner_split(
            dev, column, cfg.finetune.val_fraction, derive_seed(cfg.seed, "federated-val")
        )
    except DataError:  # too few patients to hold some out: train on all, report no validation metrics
        log.warning(
            "%d patients hold %s labels here: too few for a validation split",
            dev["patient_id"].nunique(),
            task,
        )
        train, val = dev, dev.iloc[0:0]
    return train.sort_values("image_id").reset_index(drop=True), val.reset_index(drop=True)


def site_tasks(rows: pd.DataFrame, tasks: tuple[str, ...]) -> list[str]:
    """The tasks among `tasks` this site holds labels for."""
    return [t for t in tasks if len(labelled(rows, t))]
