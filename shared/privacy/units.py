"""Opacus's DP optimiser with the privacy unit (a patient, or an image) as its "sample". Its own module so
that only a site training with DP imports opacus (`shared/privacy/sgd.py` imports it when it attaches)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus.optimizers import DPOptimizer


class UnitOptimizer(DPOptimizer):
    """Opacus's DPOptimizer whose "samples" are units: per-image gradients are summed per unit first.

    Parameters that took no part in the step (another task's head) have zero per-sample gradients and get
    noise like the rest: an empty batch, where no parameter has any, must look like every other step."""

    units: torch.Tensor = torch.zeros(0, dtype=torch.long)

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool | None:
        self._per_unit()
        return super().pre_step(closure)

    def _per_unit(self) -> None:
        """Replace each parameter's per-image gradients by per-unit sums (Opacus then clips those)."""
        unique, inverse = torch.unique(self.units, return_inverse=True)
        for p in self.params:
            grads = p.grad_sample
            if grads is None:
                p.grad_sample = p.new_zeros((len(unique), *p.shape))
                continue
            grads = torch.cat(grads) if isinstance(grads, list) else grads
            if len(unique) < len(grads):  # some unit has several images in this batch
                summed = grads.new_zeros((len(unique), *grads.shape[1:]))
                grads = summed.index_add_(0, inverse.to(grads.device), grads)
            p.grad_sample = grads
