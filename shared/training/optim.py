"""Optimisers and schedules: LAMB as SparK uses it, AdamW, and per-step lr / weight-decay schedules.

SparK's recipe: LAMB with betas (0.9, 0.95), eps 1e-6, global gradient-norm clipping at 5 *inside* the
optimiser, bias correction, trust ratio ||p|| / ||update|| only for groups with weight decay; lr = base_lr *
batch / 256 with linear warm-up from 0.5% then cosine down to 0.1%; weight decay rising by a cosine from
wd to wd_end; no decay on norms, biases and mask tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from shared.spark.sparse import MaskedGroupNorm

NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, MaskedGroupNorm)


class Lamb(torch.optim.Optimizer):
    """Layer-wise adaptive moments (You et al. 2020) with SparK's (timm 0.5.4) details, written afresh."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 5.0,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return loss
        clip = 1.0
        if self.max_grad_norm:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            clip = torch.clamp(norm / self.max_grad_norm, min=1.0)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad / clip
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = float(state["step"])
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
                update = (state["exp_avg"] / (1 - beta1**step)) / denom
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                    w_norm, u_norm = p.norm(), update.norm()
                    trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                    update.mul_(trust)
                p.add_(update, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and (no decay) norms, biases, 1-D tensors and mask tokens."""
    in_norm = {id(p) for m in model.modules() if isinstance(m, NORMS) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or id(p) in in_norm or "mask_token" in name or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "decays": True},
        {"params": no_decay, "weight_decay": 0.0, "decays": False},
    ]


def make_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, betas: tuple[float, float], clip: float
) -> torch.optim.Optimizer:
    return optimizer_for(param_groups(model, weight_decay), name, lr, betas, clip)


def optimizer_for(
    groups: list[dict], name: str, lr: float, betas: tuple[float, float], clip: float
) -> torch.optim.Optimizer:
    """Optimiser `name` over parameter groups (each may carry its own `lr_scale` and decay)."""
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, max_grad_norm=clip)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimiser {name!r}")


@dataclass(frozen=True)
class Schedule:
    """Per-step lr and weight decay for `total` steps: linear warm-up, cosine lr decay, cosine wd rise."""

    peak_lr: float
    total: int
    warmup: int
    wd: float
    wd_end: float
    start_ratio: float = 0.005
    end_ratio: float = 0.001

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.peak_lr * (self.start_ratio + (1 - self.start_ratio) * step / self.warmup)
        span = max(self.total - 1 - self.warmup, 1)
        progress = min((step - self.warmup) / span, 1.0)
        low = self.end_ratio * self.peak_lr
        return low + (self.peak_lr - low) * 0.5 * (1 + math.cos(math.pi * progress))

    def weight_decay(self, step: int) -> float:
        progress = min(step / max(self.total - 1, 1), 1.0)
        return self.wd_end + 0.5 * (self.wd - self.wd_end) * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set this step's lr (and decay, on decayed groups); returns the lr."""
        lr, wd = self.lr(step), self.weight_decay(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if group.get("decays"):
                group["weight_decay"] = wd
        return lr
