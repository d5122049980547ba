"""LRP heatmaps of a TaskModel's decision, and how well they fall on the lesions (Srinivasan et al. 2022).

Layer-wise relevance propagation (zennit 0.5.1) starts at one output logit with relevance equal to the
logit's value and redistributes it layer by layer down to the pixels, conserving its sum: the pixels'
relevance adds up to the logit (conservation). Rules, the alpha1-beta0 composite in the form of zennit's
EpsilonPlusFlat:
- every convolution: ZPlus, which is alpha1-beta0 (relevance follows the positive contributions only);
- the task head (a 1x1 conv on the pooled features: a dense layer): epsilon (1e-6), so evidence for the
  class stays positive even when the logit is negative;
- the first convolution: flat (relevance spread evenly over its receptive field), since pixels are not
  activations for ZPlus's positivity argument;
- activations pass relevance on unchanged; the global average pool and zennit's Sum modules share it in
  proportion to each input's contribution (zennit's Norm).

Canonizers make the networks fit those rules for the duration of one call (zennit's context manager removes
them, so the model is unchanged afterwards):
- ResNet50: zennit's ResNetCanonizer merges each BatchNorm into its conv and routes the skip additions
  through Sum modules (without it, relevance doubles at each of the 16 additions). It overrides each
  Bottleneck's `forward`; our `forward_features` (what TaskModel runs, not ResNet.forward) calls each block
  as `block(x)` when no mask is given, so the override is on the executed path.
- nn-MobileNet: BatchNorm merged into the preceding conv (SequentialMergeBatchNorm: in module order every BN
  follows its conv, in the stem, in each block, in the SE and in the pen); the partial residual
  `cat([out[:, :c] + x, out[:, c:]])` through a Sum module; the SE gate `x * g` treated as a constant
  multiplier whose product's relevance all goes to x (as LRP treats LSTM gates, Arras et al. 2017). A merely
  detached gate would not do: backpropagation would scale the relevance by g < 1 and lose the rest.
- TaskModel pools with `.mean`; we run the same computation with an AdaptiveAvgPool2d module so that the
  pool has a rule. GroupNorm (DP) models are refused: zennit has no GroupNorm rule and their relevance
  vanishes (privacy-and-analysis.md section 1).

A pixel-level heatmap pools the relevance of the three colour channels (`CHANNEL_POOLS`): "sum" (the
conserving choice: the map still adds up to the logit, and negative evidence stays negative) or "max_abs"
(the largest absolute channel relevance, a max-norm pooling: never negative, so it marks where the model
looks whatever the sign).

Scores against a lesion mask (Arras et al., CLEVR-XAI):
- relevance mass accuracy: the share of the positive relevance that lies inside the mask;
- relevance rank accuracy: the share of the K most relevant pixels that lie inside it, K = the mask's area;
- `random_control`: a Gaussian heatmap, the chance level: pixels are exchangeable, so both scores equal the
  mask's area fraction in expectation.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn
from zennit.canonizers import AttributeCanonizer, Canonizer, SequentialMergeBatchNorm
from zennit.composites import (
    MixedComposite,
    NameMapComposite,
    SpecialFirstLayerMapComposite,
    layer_map_base,
)
from zennit.core import Composite
from zennit.layer import Sum
from zennit.rules import Epsilon, Flat, ZPlus
from zennit.torchvision import ResNetCanonizer
from zennit.types import Convolution

from shared.analysis import evaluating
from shared.models.heads import TaskModel
from shared.models.nnmobilenet import SE, LinearBottleneck, NNMobileNet
from shared.models.resnet import ResNetEncoder
from shared.spark.sparse import MaskedGroupNorm

CHANNEL_POOLS = ("sum", "max_abs")
_HEAD_CONV = "head.1"  # the head's 1x1 conv inside `_TaskLogits` (ClassifierHead = Dropout, Conv2d)


def relevance_map(
    model: TaskModel,
    images: torch.Tensor,
    task: str,
    target_class: int,
    channel_pool: Sequence[str] = CHANNEL_POOLS,
) -> dict[str, np.ndarray]:
    """{pooling: (B, H, W) float32 heatmaps} of `target_class`'s logit for `images` (B, 3, H, W).

    `images` are normalised as the model expects; each pooling in `channel_pool` is one of `CHANNEL_POOLS`.
    """
    relevance, _ = input_relevance(model, images, task, target_class)
    return {mode: pool_channels(relevance, mode).cpu().numpy() for mode in channel_pool}


def input_relevance(
    model: TaskModel, images: torch.Tensor, task: str, target_class: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(relevance (B, 3, H, W), logits (B,)): LRP of each image's `target_class` logit, started at the logit.

    By conservation each image's relevance sums to its logit, up to what biases absorb and, in nn-MobileNet,
    what ZPlus drops at outputs of the linear projections that have no positive contribution (measured with
    zero biases: 1e-4 of the logit, 6e-3 at worst; ResNet50: 2e-6). Runs in eval mode; the model's mode,
    parameters and modules are as before afterwards.
    """
    _check_request(model, images, task, target_class)
    net = _TaskLogits(model, task)
    x = images.detach().to(next(model.parameters()).device).requires_grad_(True)
    with evaluating(model), lrp_composite(model.encoder).context(net) as canonical:
        logits = canonical(x)[:, target_class]
        (relevance,) = torch.autograd.grad(logits, x, grad_outputs=logits.detach())
    return relevance.detach(), logits.detach()


def lrp_composite(encoder: nn.Module) -> Composite:
    """The alpha1-beta0 composite (see the module docstring) with the canonizers for `encoder`."""
    layer_map = [*layer_map_base(), (Convolution, ZPlus())]
    return MixedComposite(
        [
            NameMapComposite([((_HEAD_CONV,), Epsilon())]),
            SpecialFirstLayerMapComposite(layer_map, first_map=[(Convolution, Flat())]),
        ],
        canonizers=canonizers(encoder),
    )


def canonizers(encoder: nn.Module) -> list[Canonizer]:
    """zennit canonizers that put `encoder` into a form the LRP rules apply to."""
    if isinstance(encoder, ResNetEncoder):
        return [ResNetCanonizer()]
    if isinstance(encoder, NNMobileNet):
        return [
            SequentialMergeBatchNorm(),
            AttributeCanonizer(_summed_residual),
            AttributeCanonizer(_constant_gate),
        ]
    raise ValueError(f"model: no LRP canonizers for a {type(encoder).__name__}; use nn-MobileNet or ResNet50")


def pool_channels(relevance_bchw: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, H, W) pixel relevance: the channels' "sum" or their largest absolute value ("max_abs")."""
    if mode == "sum":
        return relevance_bchw.sum(dim=1)
    if mode == "max_abs":
        return relevance_bchw.abs().amax(dim=1)
    raise ValueError(f"channel_pool: unknown pooling {mode!r}; use one of {', '.join(CHANNEL_POOLS)}")


def relevance_mass_accuracy(heatmap: ArrayLike, mask: ArrayLike) -> float:
    """The share of the positive relevance inside `mask` (nonzero = inside): sum(R+ inside) / sum(R+).

    1.0 when all positive relevance is on the lesions; NaN for an empty mask or a heatmap with no positive
    relevance (nothing to score).
    """
    relevance, inside = _heatmap_and_mask(heatmap, mask)
    positive = np.clip(relevance, 0.0, None)
    total = positive.sum()
    if total == 0 or not inside.any():
        return float("nan")
    return float(positive[inside].sum() / total)


def relevance_rank_accuracy(heatmap: ArrayLike, mask: ArrayLike) -> float:
    """The share of the K most relevant pixels that lie inside `mask`, K = the mask's pixel count.

    Ties at the K-th value go to the earlier pixel in row-major order (a stable sort), so the score is
    deterministic. NaN for an empty mask.
    """
    relevance, inside = _heatmap_and_mask(heatmap, mask)
    k = int(inside.sum())
    if k == 0:
        return float("nan")
    top = np.argsort(-relevance.ravel(), kind="stable")[:k]
    return float(inside.ravel()[top].mean())


def random_control(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A standard Gaussian heatmap of `shape`: the chance level, whose relevance mass and rank accuracies
    equal the mask's area fraction in expectation."""
    return rng.standard_normal(shape)


class _TaskLogits(nn.Module):
    """TaskModel.forward for one task, with the global average pool as a module so that it gets a rule."""

    def __init__(self, model: TaskModel, task: str) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = model.heads[task]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.encoder.forward_features(x)[-1])).flatten(1)


class _ConstantGate(torch.autograd.Function):
    """x * gate, with all relevance of the product passed to x and none to the gate."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, gate: torch.Tensor
    ) -> torch.Tensor:
        return x * gate

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, relevance: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        return relevance, None


def _summed_residual(_name: str, module: nn.Module) -> dict[str, object] | None:
    """For a block with the partial residual: a forward whose addition is a zennit Sum module."""
    if isinstance(module, LinearBottleneck) and module.use_shortcut:
        return {"forward": partial(_bottleneck_forward, module), "canonizer_sum": Sum()}
    return None


def _bottleneck_forward(block: LinearBottleneck, x: torch.Tensor) -> torch.Tensor:
    """LinearBottleneck.forward (dense) with `out[:, :c] + x` as Sum over a stacked last dimension."""
    out = block.out(x)
    c = block.in_channels
    summed = block.canonizer_sum(torch.stack([out[:, :c], x], dim=-1))
    return block.drop(torch.cat([summed, out[:, c:]], dim=1))


def _constant_gate(_name: str, module: nn.Module) -> dict[str, object] | None:
    """For an SE module: a forward whose gate is a constant for LRP."""
    if isinstance(module, SE):
        return {"forward": partial(_se_forward, module)}
    return None


def _se_forward(se: SE, x: torch.Tensor) -> torch.Tensor:
    """SE.forward (dense) with the gate computed off the graph: the backward pass must not reach the SE's
    layers at all (zennit's rules there would receive no relevance and fail)."""
    return _ConstantGate.apply(x, se.fc(se.avg_pool(x.detach())))


def _check_request(model: TaskModel, images: torch.Tensor, task: str, target_class: int) -> None:
    if not isinstance(model, TaskModel):
        raise ValueError(f"model: expected a TaskModel (encoder + heads), got {type(model).__name__}")
    if task not in model.heads:
        raise ValueError(f"task: {task!r} is not one of the model's tasks ({', '.join(model.heads)})")
    classes = model.heads[task][1].out_channels
    if not 0 <= target_class < classes:
        raise ValueError(f"target_class: {target_class} is not a class of {task!r} (0..{classes - 1})")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (B, 3, H, W), got shape {tuple(images.shape)}")
    if any(isinstance(m, nn.GroupNorm | MaskedGroupNorm) for m in model.modules()):
        raise ValueError("model: LRP needs a BatchNorm model (norm='bn'); zennit has no GroupNorm rule")


def _heatmap_and_mask(heatmap: ArrayLike, mask: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    relevance = np.asarray(heatmap, dtype=np.float64)
    inside = np.asarray(mask) != 0
    if relevance.ndim != 2 or relevance.shape != inside.shape:
        raise ValueError(
            f"heatmap, mask: need two 2-D arrays of one shape, got {relevance.shape} and {inside.shape}"
        )
    if not np.isfinite(relevance).all():
        raise ValueError("heatmap: contains NaN or infinite values")
    return relevance, inside
