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

    `x` may hold anything at masked positions (a convolution's raw output): statistics are mask-weighted.
    Training: biased batch statistics normalise, running statistics take the unbiased variance with
    `bn.momentum`, as nn.BatchNorm does, but over visible positions only. Eval: running statistics.
    """
    m = mask.like(x)
    if bn.training or not bn.track_running_stats:
        weight = bn.weight if bn.affine else torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
        bias = bn.bias if bn.affine else torch.zeros_like(weight)
        y, mean, var, n = _MaskedBatchNorm.apply(x, m, weight, bias, bn.eps)
        if bn.training and bn.track_running_stats:
            _update_running(bn, mean, var, n)
        return y
    scale = torch.rsqrt(bn.running_var + bn.eps) * (bn.weight if bn.affine else 1.0)
    shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
    return torch.addcmul(shift[None, :, None, None], x, scale[None, :, None, None]) * m


class _MaskedBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm over visible positions, with a hand-written backward.

    Autograd of the plain formula takes about ten full-size passes each way; here the forward is two
    reductions and one fused multiply-add, the backward a few passes with per-channel coefficients (the
    standard BatchNorm gradient restricted to visible positions: hidden ones get 0).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        m: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        n = m.sum()  # visible positions over the batch
        mean = _visible_sum(x, m) / n
        var = (_visible_sum(x * x, m) / n - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        scale = invstd * weight
        shift = bias - mean * scale
        y = torch.addcmul(shift[None, :, None, None], x, scale[None, :, None, None]).mul_(m)
        ctx.save_for_backward(x, m, weight, mean, invstd)
        ctx.n = n
        ctx.mark_non_differentiable(mean, var, n)
        return y, mean, var, n

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor, *_: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, m, weight, mean, invstd = ctx.saved_tensors
        n = ctx.n
        sum_dy = _visible_sum(dy, m)  # dy is not 0 where hidden (later convs spread it): weigh by the mask
        sum_dy_xhat = (_visible_sum(dy * x, m) - mean * sum_dy) * invstd  # sum of dy * xhat over visible
        k = weight * invstd
        # dx = k * (dy - sum_dy / n - xhat * sum_dy_xhat / n), at visible positions
        coef_x = -k * invstd * sum_dy_xhat / n
        const = -k * sum_dy / n - coef_x * mean
        dx = torch.addcmul(const[None, :, None, None], x, coef_x[None, :, None, None])
        dx.addcmul_(dy, k[None, :, None, None]).mul_(m)
        return dx, None, sum_dy_xhat, sum_dy, None


def _visible_sum(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-channel sum of x over visible positions, as a batched matrix-vector product: no (B, C, H, W)
    temporary for x * m (channels_last inputs are copied to NCHW first)."""
    b, c, h, w = x.shape
    return torch.bmm(x.reshape(b, c, h * w), m.reshape(b, h * w, 1)).sum(dim=(0, 2))


def _update_running(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
    n = float(n)
    bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    unbiased = var * (n / max(n - 1.0, 1.0))
    bn.running_mean.mul_(1 - momentum).add_(mean.to(bn.running_mean.dtype), alpha=momentum)
    bn.running_var.mul_(1 - momentum).add_(unbiased.to(bn.running_var.dtype), alpha=momentum)


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
