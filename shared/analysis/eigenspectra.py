"""Activation spectra: how evenly a network spreads its features over directions, layer by layer.

For each conv block we run images through the encoder, treat every spatial position of every image as one
sample of a C-dimensional vector (C = the block's channels), and take the eigenvalues of the C x C channel
covariance: the layer's activation spectrum. Srinivasan et al. compare ImageNet-initialised, self-supervised
and randomly initialised models through three summaries of it:

- `percentile_condition_number`: the eigenvalue at the 90th percentile of the spectrum over the one at the
  10th. The plain lambda_max / lambda_min is decided by the smallest eigenvalue, which is ~0 whenever a layer
  has more channels than samples (deep layers of small inputs) or dead channels; percentiles ignore those
  tails. A large value means a few directions carry most of the variance (an ill-conditioned representation).
- `eigen_density`: the first layer's eigenvalue density on log-spaced bins, for the log-log plot.
- `pareto_fit`: a power law p(x) ~ x^-(b+1) for x >= x_min fitted to those eigenvalues; a smaller exponent b
  is a heavier tail (fewer dominant directions). loc is fixed at 0 and scale at min(x): with loc free,
  scipy's three-parameter fit degenerates on such data (b ~ 1e4 with loc ~ -scale; privacy-and-analysis.md
  section 3), and with loc = 0 the maximum-likelihood fit is closed-form.

Layers (`conv_blocks`), in forward order: nn-MobileNet's stem activation (features.2, the SiLU after the
stem conv and its BatchNorm), its 16 LinearBottlenecks and its pen activation (features.21, the SiLU after
the 1x1 pen conv and its BatchNorm): 18 layers; ResNet50's stem activation (relu, after conv1 and bn1, before
the max pool) and its 16 Bottlenecks: 17. A block's spectrum is of its output (after the residual). Every
tapped layer is thus a representation the next layer reads. A raw conv output would not do: it is a linear
map of its input patch, so nn-MobileNet's stem conv, which maps 3x3x3 = 27 input values to 32 or more
channels, has a covariance of rank <= 27 by construction (condition number inf whatever was learned); its
SiLU output is full rank.

Covariances are accumulated in float64 from per-batch moments (Chan et al.'s pairwise update), so memory
stays O(C^2) per layer whatever the number of images. Eigenvalues at round-off level are returned as 0, so a
layer seen at fewer positions than it has channels (deep layers of few, small images), or with dead
channels, reads as rank-deficient (an infinite condition number) rather than as a finite ratio of noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy import stats
from torch import nn
from torchvision.models.resnet import Bottleneck

from shared.analysis import evaluating
from shared.models.heads import TaskModel
from shared.models.nnmobilenet import LinearBottleneck, NNMobileNet
from shared.models.resnet import ResNetEncoder

Images = torch.Tensor | Iterable[torch.Tensor]


def conv_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose spectra we take, by their names in the encoder, in forward order: the stem's
    activation, the blocks and (nn-MobileNet) the pen's activation."""
    encoder = _encoder(model)
    if isinstance(encoder, NNMobileNet):
        kinds = (nn.SiLU, LinearBottleneck)  # among `features`: the stem's SiLU, the blocks, the pen's SiLU
        return {f"features.{i}": m for i, m in enumerate(encoder.features) if isinstance(m, kinds)}
    # forward_features calls the encoder's own relu once, for the stem; each Bottleneck has its own
    return {"relu": encoder.relu} | {
        name: m for name, m in encoder.named_modules() if isinstance(m, Bottleneck)
    }


class ChannelMoments:
    """Running mean and scatter matrix of C-dimensional samples, in float64, on the activations' device."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = torch.zeros(0, dtype=torch.float64)
        self.scatter = torch.zeros(0, 0, dtype=torch.float64)

    def update(self, acts_bchw: torch.Tensor) -> None:
        """Add every position of every image in `acts_bchw` as one sample (pairwise merge of moments)."""
        samples = acts_bchw.detach().transpose(0, 1).flatten(1).T.to(torch.float64)  # (B*H*W, C)
        n = samples.shape[0]
        mean = samples.mean(dim=0)
        centred = samples - mean
        scatter = centred.T @ centred
        if self.count == 0:
            self.count, self.mean, self.scatter = n, mean, scatter
            return
        delta = mean - self.mean
        total = self.count + n
        self.scatter = self.scatter + scatter + torch.outer(delta, delta) * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.count = total

    def covariance(self) -> np.ndarray:
        """The unbiased C x C sample covariance."""
        if self.count < 2:
            raise ValueError(f"images: {self.count} activation sample(s) seen; pass at least one image")
        return (self.scatter / (self.count - 1)).cpu().numpy()

    def eigenvalues(self) -> np.ndarray:
        """The covariance's eigenvalues, descending, with the numerically null ones as 0: those below
        numpy's rank tolerance, lambda_max * C * float64 eps (`np.linalg.matrix_rank`'s), are round-off
        (~1e-16 of lambda_max, of either sign), not variance."""
        values = np.linalg.eigvalsh(self.covariance())[::-1]
        floor = values.max(initial=0.0) * len(values) * np.finfo(np.float64).eps
        return np.where(values < floor, 0.0, values)


def activation_spectra(model: nn.Module, images: Images, *, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Eigenvalues (descending, float64, round-off as 0) of each tapped layer's channel covariance over
    `images`.

    `model` is an NNMobileNet or ResNetEncoder, or a TaskModel holding one (its encoder is used). `images`
    is a tensor (N, 3, H, W), split into batches of `batch_size`, or an iterable of such batches, already
    normalised as the model expects. Runs in eval mode (the model's mode is restored after).

    Returns {layer name: eigenvalues}, one entry per `conv_blocks(model)`, each of length C.
    """
    moments = activation_moments(model, images, batch_size=batch_size)
    return {name: m.eigenvalues() for name, m in moments.items()}


@torch.no_grad()
def activation_moments(
    model: nn.Module, images: Images, *, batch_size: int = 16
) -> dict[str, ChannelMoments]:
    """The streamed channel moments behind `activation_spectra` (same arguments), before any
    eigendecomposition (which dominates the cost for wide layers: ~3 s for C = 2048 on two CPU cores)."""
    encoder = _encoder(model)
    layers = conv_blocks(encoder)
    moments = {name: ChannelMoments() for name in layers}
    handles = [module.register_forward_hook(_recorder(moments[name])) for name, module in layers.items()]
    device = next(encoder.parameters()).device
    try:
        with evaluating(encoder):
            for batch in _batches(images, batch_size):
                encoder.forward_features(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return moments


def percentile_condition_number(eigenvalues: ArrayLike, *, low: float = 10.0, high: float = 90.0) -> float:
    """lambda_(high) / lambda_(low): the eigenvalues at the `high`-th and `low`-th percentiles of a spectrum.

    Percentiles are numpy's default ("linear"): with the n eigenvalues sorted ascending, v_0 <= ... <=
    v_(n-1), the q-th percentile is taken at position p = q / 100 * (n - 1), interpolating linearly between
    v_floor(p) and v_ceil(p). The input's order does not matter. Returns inf when the `low` percentile is 0
    (over `low`% of the spectrum is null).

    >>> percentile_condition_number(np.arange(1.0, 12.0))  # positions 1 and 9: 10 / 2
    5.0
    """
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"low={low}, high={high}: need 0 <= low < high <= 100 (percentiles)")
    values = _spectrum(eigenvalues, "eigenvalues")
    if (values < 0).any():
        raise ValueError("eigenvalues: negative values; pass a covariance spectrum (clip round-off at 0)")
    bottom, top = np.percentile(values, [low, high])
    return float(top / bottom) if bottom > 0 else float("inf")


def eigen_density(eigenvalues: ArrayLike, bins: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """(edges, density) of the positive eigenvalues on `bins` log-spaced bins from their min to their max.

    `density` is per unit eigenvalue (counts / (n * bin width)), so sum(density * diff(edges)) == 1: a
    probability density that can be compared with a fitted Pareto pdf on log-log axes. Null eigenvalues have
    no place on a log axis and are left out (n counts the positive ones).
    """
    if bins < 1:
        raise ValueError(f"bins={bins}: need at least one bin")
    values = _spectrum(eigenvalues, "eigenvalues")
    positive = values[values > 0]
    if positive.size == 0 or positive.min() == positive.max():
        raise ValueError("eigenvalues: need two different positive values for a log-spaced histogram")
    edges = np.geomspace(positive.min(), positive.max(), bins + 1)
    counts, _ = np.histogram(positive, bins=edges)
    return edges, counts / (positive.size * np.diff(edges))


class ParetoFit(NamedTuple):
    """A Pareto fit with loc = 0: density b * scale^b / x^(b+1) for x >= scale, and its KS test."""

    b: float
    scale: float
    ks_statistic: float
    ks_pvalue: float


def pareto_fit(x: ArrayLike) -> ParetoFit:
    """Maximum-likelihood Pareto fit with loc fixed at 0, as `scipy.stats.pareto.fit(x, floc=0)`.

    scale = min(x) and b = n / sum(log(x / scale)) (closed form). The Kolmogorov-Smirnov test is against
    `scipy.stats.pareto(b, loc=0, scale=scale)`; since b and scale come from the same data, its p-value is
    optimistic (a small p-value still rejects the power law). `x` must be positive: drop null eigenvalues.
    """
    values = _spectrum(x, "x")
    if values.size < 2 or (values <= 0).any():
        raise ValueError("x: need at least two positive values (drop null eigenvalues: x[x > 0])")
    scale = values.min()
    log_sum = np.log(values / scale).sum()
    if log_sum == 0:
        raise ValueError("x: all values are equal; a Pareto exponent needs a spread")
    b = values.size / log_sum
    ks = stats.kstest(values, stats.pareto(b, loc=0, scale=scale).cdf)
    return ParetoFit(float(b), float(scale), float(ks.statistic), float(ks.pvalue))


def _encoder(model: nn.Module) -> NNMobileNet | ResNetEncoder:
    encoder = model.encoder if isinstance(model, TaskModel) else model
    if not isinstance(encoder, NNMobileNet | ResNetEncoder):
        raise ValueError(
            f"model: {type(encoder).__name__} is not supported; pass an NNMobileNet or ResNetEncoder "
            "(or a TaskModel holding one)"
        )
    return encoder


def _recorder(moments: ChannelMoments) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
    """A forward hook that adds the module's output to `moments`."""

    def hook(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        moments.update(output)

    return hook


def _batches(images: Images, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images: expected (N, 3, H, W), got shape {tuple(images.shape)}")
        yield from images.split(batch_size)
        return
    for batch in images:
        if not isinstance(batch, torch.Tensor):
            raise ValueError(
                f"images: batches must be tensors (B, 3, H, W), got {type(batch).__name__}; "
                "from a loader of (x, y) pairs pass (x for x, _ in loader)"
            )
        yield batch


def _spectrum(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0 or not np.isfinite(array).all():
        raise ValueError(f"{name}: need a non-empty array of finite values")
    return array
