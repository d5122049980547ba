"""Where training starts: the seeded pretraining and fine-tuning models, and where their encoder starts
(scratch, a SparK, MoCo, MAE or natural-photo export of ours, ImageNet weights, or a ViT-MAE checkpoint).

Our exports are safetensors files that record their architecture, so a file from another architecture is
refused in one line. ImageNet weights are read from a local file in torchvision's format (`resnet50`'s
`.pth` state dict) or ReXNet's (`rexnet_3.0.pth` for nn-MobileNet at width 3.0), with
`torch.load(weights_only=True)`: nothing is downloaded and nothing is unpickled beyond tensors. A ViT-MAE
checkpoint in RETFound's published format (a `.pth` whose `model` entry holds timm's ViT keys, MAE's decoder
beside them) is read the same way, its decoder left out.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from shared.config import ExperimentConfig, ModelConfig
from shared.errors import CheckpointError, ConfigError
from shared.models import TaskModel, build_encoder
from shared.seeding import derive_seed, seed_everything
from shared.training.finetune import build_task_model
from shared.training.mae import build_mae
from shared.training.moco import build_moco
from shared.training.natural import build_natural
from shared.training.pretrain import build_spark
from shared.weights import check_meta, load_into, load_weights, model_meta

HEAD_PREFIXES = ("fc.", "output.", "out.", "classifier.")  # ImageNet classifiers' heads, left out
IMAGENET = (
    "ImageNet weights",
    "download them once (e.g. torchvision's resnet50 IMAGENET1K_V1 .pth) on a connected machine and give "
    "their local path",
)
# a ViT-MAE checkpoint's parts the encoder does not hold: MAE's decoder and mask token, a fine-tuned head
MAE_ONLY = ("decoder_", "mask_token", "head.", "fc_norm.")
MAE_CHECKPOINT = (
    "ViT-MAE checkpoint",
    "download it once (e.g. RETFound's RETFound_cfp_weights.pth, a ViT-L/16: model.arch vit_large) on a "
    "connected machine and give its local path",
)
FINETUNE_SEED = "init-finetune"  # the heads of federated phase 2 and of the hold-out protocol start alike


def check_init(kind: str, weights: str | None, model_cfg: ModelConfig) -> None:
    """Fail fast, before any data work or any run folder: the file exists, is of this kind and architecture,
    and loads strictly (every key, every shape) into the encoder it will start."""
    if kind != "scratch":
        initialise(build_encoder(model_cfg), kind, weights, model_cfg)


def initialise(encoder: nn.Module, kind: str, weights: str | None, model_cfg: ModelConfig) -> str:
    """Load the encoder's starting weights in place; returns a one-line description for logs and reports."""
    if kind == "scratch":
        return "random initialisation"
    if not weights:
        raise CheckpointError(f"init {kind!r} needs a weights file (finetune.inits.<name>.weights)")
    path = Path(weights)
    if kind == "imagenet":
        tensors = _torch_state(path, HEAD_PREFIXES, IMAGENET)
        load_into(encoder, tensors, path, strict=True)
        return f"ImageNet weights from {path}"
    if kind == "mae" and path.suffix != ".safetensors":
        if not model_cfg.arch.startswith("vit_"):
            raise CheckpointError(
                f"{path}: a ViT-MAE checkpoint needs model.arch vit_* (got {model_cfg.arch})"
            )
        load_into(encoder, _torch_state(path, MAE_ONLY, MAE_CHECKPOINT), path, strict=True)
        return f"ViT-MAE checkpoint {path}"
    tensors, meta = _our_export(path, kind, model_cfg)
    load_into(encoder, tensors, path, strict=True)
    return f"{kind} encoder from {path} ({meta.get('epochs', '?')} epochs)"


def read_encoder_export(path: Path, model_cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], str]:
    """An encoder export of ours, read once, whatever method made it: its tensors and its kind (spark or
    moco), checked against the model."""
    tensors, meta = _our_export(path, None, model_cfg)
    return tensors, str(meta["kind"]).removesuffix("-encoder")


def _our_export(path: Path, kind: str | None, model_cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """An encoder export of ours for this model: of `kind`, or (None) of either method's."""
    tensors, meta = load_weights(path)
    if kind is None:
        kind = str(meta.get("kind", "")).removesuffix("-encoder")
        if kind not in ("spark", "moco", "mae"):
            raise CheckpointError(
                f"{path}: not a SparK, MoCo or MAE encoder export (its kind is {meta.get('kind')!r})"
            )
    check_meta(path, meta, {"kind": f"{kind}-encoder", **model_meta(model_cfg)})
    return tensors, meta


def _torch_state(path: Path, dropped: tuple[str, ...], source: tuple[str, str]) -> dict[str, torch.Tensor]:
    """A tensors-only PyTorch state dict (unwrapped from `state_dict` / `model`, `module.` stripped), less
    the keys starting with `dropped` (what the encoder does not hold: heads, MAE's decoder). `source`:
    what the file is and how to get it, for the one line that says it is missing."""
    if not path.is_file():
        what, how = source
        raise CheckpointError(f"{path}: {what} file not found; {how}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(
            f"{path}: not a tensors-only PyTorch state dict ({str(exc).splitlines()[0]})"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return {
        k.removeprefix("module."): v
        for k, v in state.items()
        if not k.removeprefix("module.").startswith(dropped)
    }


def pretraining_start(cfg: ExperimentConfig) -> nn.Module:
    """The seeded model a pretraining run starts from (SparK, MoCo, or the natural-photo classifier), its
    encoder initialised as `pretrain.init` says (scratch, ImageNet, or an earlier export: MoCo from ImageNet
    is the second seed's fourth setup).
    `fedretina pretrain` and the federated server both start here."""
    method, vit = cfg.pretrain.method, cfg.model.arch.startswith("vit_")
    if vit and method in ("spark", "moco"):
        raise ConfigError(
            f"pretrain.method: {method} needs a CNN encoder; a ViT ({cfg.model.arch}) pretrains with mae"
        )
    if method == "mae" and not vit:
        raise ConfigError("pretrain.method: mae pretrains a ViT; set model.arch to vit_tiny (or larger)")
    seed_everything(derive_seed(cfg.seed, "init"))
    encoder = build_encoder(cfg.model)
    init = cfg.pretrain.init
    initialise(encoder, init.kind, init.weights, cfg.model)
    builders = {"spark": build_spark, "moco": build_moco, "natural": build_natural, "mae": build_mae}
    return builders[cfg.pretrain.method](cfg, encoder)


def finetuning_start(cfg: ExperimentConfig, tasks: dict[str, int], *seed_keys: object) -> TaskModel:
    """The seeded task model (encoder and one head per task) a fine-tuning starts from, before its encoder
    gets its starting weights; `seed_keys` name the run (`FINETUNE_SEED`, or a CV arm's init and fold)."""
    seed_everything(derive_seed(cfg.seed, *seed_keys))
    return build_task_model(cfg, tasks)
