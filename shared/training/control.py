"""SCAFFOLD at a site (Karimireddy et al. 2020): control variates that take a site's drift out of its
local steps.

Each site keeps its own control variate c_i (the mean gradient it saw in its last round); the server sends
its own, c (the example-weighted average of the sites' c_i). Every local gradient g becomes g - c_i + c
before the optimiser sees it, so a site whose data pull one way steps as if it saw the federation's mean
gradient direction plus its own batch's noise around it. This is the paper's option I (c_i from gradients
the site computed anyway, along its round rather than in an extra pass at the round's start), and works
under any optimiser, since the correction acts on the gradient. A site that has not trained yet holds
c_i = 0, and the server starts at c = 0: the first round is FedAvg's.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import nn

from shared.errors import ConfigError
from shared.training.moments import CONTROL, SEPARATOR, split, stepping


class ControlVariates:
    """Attached to the round's optimiser (`attach`), before each step it adds (c - c_i) to every gradient
    and accumulates the raw gradient; `controls` is the site's new c_i, the mean raw gradient of each
    parameter that stepped."""

    def __init__(
        self, model: nn.Module, server: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]
    ) -> None:
        self.names = {param: name for name, param in model.named_parameters()}
        shapes = {name: param.shape for name, param in model.named_parameters()}
        # the server's input: checked here, where the site reads it; the site's own was checked when saved
        self.server = {_parameter(k, v, shapes): v.detach().clone() for k, v in server.items()}
        self.own = {_parameter(k, v, shapes): v.detach().clone() for k, v in own.items()}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook `optimizer` (before its every step)."""
        optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer: torch.optim.Optimizer, *_: object) -> None:
        for param, grad in stepping(optimizer):
            name = self.names[param]
            self.sums.setdefault(name, torch.zeros_like(grad)).add_(grad)
            self.counts[name] = self.counts.get(name, 0) + 1
            if name in self.server:
                grad.add_(self.server[name].to(grad))
            if name in self.own:
                grad.sub_(self.own[name].to(grad))

    def controls(self, names: Collection[str]) -> dict[str, torch.Tensor]:
        """The site's new control variate of every parameter in `names` that took a step this round
        (`<name>/control`): the mean of its raw gradients. The site keeps them and sends them; the others
        keep their old value at the site and at the server."""
        return {
            f"{name}{SEPARATOR}{CONTROL}": (total / self.counts[name]).cpu()
            for name, total in self.sums.items()
            if name in names
        }


def _parameter(key: str, value: torch.Tensor, shapes: Mapping[str, torch.Size]) -> str:
    """The parameter a control variate `key` belongs to, if it is one of this model's, of its shape and
    finite; otherwise one line naming it."""
    name, entry = split(key)
    if entry != CONTROL or value.shape != shapes.get(name) or not torch.isfinite(value).all():
        raise ConfigError(f"the control variate {key!r}: not a finite tensor of a parameter of this model")
    return name
