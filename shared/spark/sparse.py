"""Sparse convolution emulated on dense tensors, as SparK does, with the mask passed explicitly.

A masked forward keeps every masked position exactly 0: a dense convolution then sees only visible
neighbours (zeros add nothing), and re-masking its output gives submanifold semantics at patch level.
BatchNorm takes its statistics (and updates its running statistics) over visible positions only; global
pooling averages visible positions only.

Unlike SparK, no module is converted and no mask lives in a module-level global: encoders take a
`SparseMask` argument and call `sparse(module, x, mask)` on their children. Parameter-owning leaves stay
standard `nn.Conv2d` / `nn.BatchNorm2d` (the sparse model *is* the dense model, same state-dict keys), and
the mask flows only through parameter-free code, so models are thread-safe and Opacus-compatible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SparseMask:
    """One batch's visible-patch mask (B, 1, f, f), True = visible, served at any resolution h = k*f.

    Upsampling is nearest-neighbour repetition (no interpolation); results are cached per size, per object.
    """

    def __init__(self, active_b1ff: torch.Tensor) -> None:
        if active_b1ff.dtype != torch.bool or active_b1ff.dim() != 4 or active_b1ff.shape[1] != 1:
            raise ValueError(
                f"expected a bool mask (B, 1, f, f), got {tuple(active_b1ff.shape)} {active_b1ff.dtype}"
            )
        self.active_b1ff = active_b1ff
        self._cache: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}
        self._rows: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def grid(self) -> int:
        return self.active_b1ff.shape[-1]

    def at(self, h: int, w: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The mask at an h x w map as (B, 1, h, w) in `dtype` (bool or a float 0/1)."""
        key = (h, w, dtype)
        if key not in self._cache:
            f = self.grid
            if h % f or w % f:
                raise ValueError(f"feature map {h}x{w} is not a multiple of the mask grid {f}x{f}")
            up = self.active_b1ff.repeat_interleave(h // f, dim=2).repeat_interleave(w // f, dim=3)
            self._cache[key] = up if dtype == torch.bool else up.to(dtype)
        return self._cache[key]

    def rows(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """Indices of the visible positions among the B*h*w positions of an h x w map, batch-major then
        row-major (the rows of a channels_last tensor)."""
        if (h, w) not in self._rows or self._rows[(h, w)].device != device:
            self._rows[(h, w)] = self.at(h, w).reshape(-1).nonzero().squeeze(1).to(device)
        return self._rows[(h, w)]

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """The mask for tensor `x` (B, C, h, w), in x's dtype and on x's device."""
        m = self.at(x.shape[-2], x.shape[-1], x.dtype)
        if m.device != x.device:
            m = m.to(x.device)
            self._cache[(x.shape[-2], x.shape[-1], x.dtype)] = m
        return m


class MaskAware(nn.Module):
    """Marker base: a module whose `forward(x, mask=None)` takes the mask; `sparse()` hands it over."""


ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Sigmoid, nn.Identity, nn.Dropout, nn.Dropout2d, nn.GELU)


def sparse(module: nn.Module, x: torch.Tensor, mask: SparseMask | None) -> torch.Tensor:
    """Apply `module` to `x` with SparK's sparse semantics when `mask` is given, densely otherwise."""
    if mask is None:
        return module(x)
    if isinstance(module, MaskAware):
        return module(x, mask)
    if isinstance(module, nn.Sequential):
        return sparse_chain(list(module), x, mask)
    if isinstance(module, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
        y = module(x)
        return y * mask.like(y)
    if isinstance(module, nn.BatchNorm2d):
        return masked_batch_norm(module, x, mask)
    if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
        return masked_mean(x, mask)
    if isinstance(module, ELEMENTWISE):  # f(0) = 0 or per-channel: zeros stay zeros
        return module(x)
    raise TypeError(f"no sparse rule for {type(module).__name__}; make it MaskAware or add a rule here")


def sparse_chain(modules: list[nn.Module], x: torch.Tensor, mask: SparseMask | None) -> torch.Tensor:
    """Apply `modules` in order; a convolution followed by a masked norm skips its own re-masking, since the
    norm takes its statistics over visible positions and masks its output (one full pass less each way)."""
    i = 0
    while i < len(modules):
        module = modules[i]
        following = modules[i + 1] if i + 1 < len(modules) else None
        if mask is not None and isinstance(module, nn.Conv2d) and isinstance(following, _masked_norms()):
            x = sparse(following, module(x), mask)
            i += 2
        else:
            x = sparse(module, x, mask)
            i += 1
    return x


def masked_mean(x: torch.Tensor, mask: SparseMask) -> torch.Tensor:
    """Per-sample, per-channel mean over visible positions, shape (B, C, 1, 1).

    `x` is a sparse feature map (0 at hidden positions, as every sparse layer leaves it), so summing all of it
    sums the visible positions: sum(x) / sum(M).
    """
    m = mask.like(x)
    return x.sum(dim=(2, 3), keepdim=True) / m.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)


def masked_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, mask: SparseMask) -> torch.Tensor:
    """BatchNorm over the visible positions of the whole batch; 0 at masked positions.

    `x` may hold anything at masked positions (a convolution's raw output). Training: the visible positions
    are gathered as rows (B*H*W, C), normalised by the native BatchNorm kernel (biased batch statistics;
    running statistics with the unbiased variance and `bn.momentum`, over visible positions only) and
    scattered back into zeros. The rows are a view of a channels_last tensor, and the output is
    channels_last, so after the first norm the whole network runs channels_last and no layout copy is
    paid. SparK gathers the same positions with advanced indexing on a permuted NCHW tensor; a flat row
    index is about 3x faster here, and faster than dense BatchNorm, which normalises every position.
    Eval: running statistics.
    """
    if bn.training or not bn.track_running_stats:
        b, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c)
        visible = mask.rows(h, w, x.device)
        track = bn.training and bn.track_running_stats
        momentum = 0.0
        if track:
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        normed = F.batch_norm(
            rows.index_select(0, visible),
            bn.running_mean if track else None,
            bn.running_var if track else None,
            bn.weight,
            bn.bias,
            True,
            momentum,
            bn.eps,
        )
        out = rows.new_zeros(rows.shape).index_copy(0, visible, normed.to(rows.dtype))  # bf16 under autocast
        return out.view(b, h, w, c).permute(0, 3, 1, 2)
    scale = torch.rsqrt(bn.running_var + bn.eps) * (bn.weight if bn.affine else 1.0)
    shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
    return torch.addcmul(shift[None, :, None, None], x, scale[None, :, None, None]) * mask.like(x)


class MaskedGroupNorm(MaskAware):
    """Per-sample GroupNorm over visible positions: the DP-ready replacement for sparse BatchNorm.

    Statistics are per sample and group, over the group's channels at visible positions only (so no
    sample's statistics depend on another's: valid under DP-SGD). The normalisation is parameter-free;
    the affine transform is a 1x1 depthwise `nn.Conv2d` (its `weight`/`bias` are gamma/beta), a standard
    single-input module whose per-sample gradients Opacus computes. Without a mask it is GroupNorm.
    """

    def __init__(self, channels: int, groups: int | None = None, eps: float = 1e-5) -> None:
        super().__init__()
        self.groups = groups or math.gcd(32, channels)
        self.eps = eps
        self.affine = nn.Conv2d(channels, channels, 1, groups=channels, bias=True)
        nn.init.ones_(self.affine.weight)
        nn.init.zeros_(self.affine.bias)

    def forward(self, x: torch.Tensor, mask: SparseMask | None = None) -> torch.Tensor:
        if mask is None:
            return self.affine(F.group_norm(x, self.groups, eps=self.eps))
        b, c, h, w = x.shape
        m = mask.like(x)
        xg = x.reshape(b, self.groups, c // self.groups, h, w)
        mg = m.reshape(b, 1, 1, h, w)
        n = mg.sum(dim=(2, 3, 4), keepdim=True) * (c // self.groups)
        mean = (xg * mg).sum(dim=(2, 3, 4), keepdim=True) / n
        centred = (xg - mean) * mg
        var = (centred * centred).sum(dim=(2, 3, 4), keepdim=True) / n
        y = (centred * torch.rsqrt(var + self.eps)).reshape(b, c, h, w)
        return self.affine(y) * m


def _masked_norms() -> tuple[type[nn.Module], ...]:
    """Norms that take mask-weighted statistics and mask their output."""
    return (nn.BatchNorm2d, MaskedGroupNorm)
