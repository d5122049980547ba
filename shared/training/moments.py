"""An optimiser's per-parameter state keyed by parameter name: what cyclic weight transfer with
`federation.carry_optimizer` hands from site to site along with the model, and what a server holds per
parameter (MimeLite's moments, SCAFFOLD's control variate) and sends with it.

torch keys an optimiser's `state_dict()` by each parameter's position in its groups, and positions depend
on which task heads a site's model holds; names do not. Every tensor entry of a parameter's state travels
(AdamW and LAMB: `exp_avg`, `exp_avg_sq`, `step`; SGD: `momentum_buffer`) as `<parameter name>/<entry>`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping

import torch
from torch import nn

from shared.errors import ConfigError
from shared.federation.strategies import Strategy

SEPARATOR = "/"
_ADAM = frozenset({"step", "exp_avg", "exp_avg_sq"})
ENTRIES = {"adamw": _ADAM, "lamb": _ADAM, "sgd": frozenset({"momentum_buffer"})}  # per optimiser name
CONTROL = "control"  # SCAFFOLD's one entry per parameter: a control variate (`shared/training/control.py`)


def stepping(optimizer: torch.optim.Optimizer) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, its gradient) for each parameter the optimiser's coming step moves, in its groups'
    order: what a step pre-hook (MimeLite's, SCAFFOLD's) works on."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                yield param, param.grad


def state_entries(strategy: Strategy, optimizer: str) -> frozenset[str]:
    """The entries per parameter of the state that travels under `strategy` with `optimizer`: SCAFFOLD's
    control variate, or the optimiser's moments (MimeLite, cyclic with carry_optimizer)."""
    return frozenset({CONTROL}) if strategy.control_variates else ENTRIES[optimizer]


def split(key: str) -> tuple[str, str]:
    """(parameter name, state entry) of a moments key."""
    name, _, entry = key.rpartition(SEPARATOR)
    return name, entry


def named_moments(
    model: nn.Module, optimizer: torch.optim.Optimizer, names: Collection[str] | None = None
) -> dict[str, torch.Tensor]:
    """The optimiser's tensor state of every parameter of `model` that has one (the trained ones), or of
    those in `names` (the parameters a site sends)."""
    out = {}
    for name, param in model.named_parameters():
        if names is not None and name not in names:
            continue
        for entry, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value):
                out[f"{name}{SEPARATOR}{entry}"] = value.detach().to("cpu", copy=True)
    return out


def with_moments(
    optimizer: torch.optim.Optimizer, model: nn.Module, moments: Mapping[str, torch.Tensor]
) -> dict:
    """`optimizer`'s state dict with the state of each parameter `moments` names replaced by those moments
    (the others keep theirs: a head the previous site lacked continues from this site's own state)."""
    by_name: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        name, entry = split(key)
        by_name.setdefault(name, {})[entry] = value.clone()
    for name, param in model.named_parameters():
        if name in by_name:
            optimizer.state[param] = by_name[name]
    return optimizer.state_dict()


class MimeMoments:
    """MimeLite at a site (Karimireddy et al. 2021, "Mime"): every local step uses the server's optimiser
    state as it was when the round began, never the state the site's own steps would build, so parallel
    sites all apply the centralised optimiser's statistics instead of drifting apart on their own.

    Attached to the round's optimiser (`attach`), before each step it puts back the server's moments of
    every parameter that has a gradient (a fresh Adam state where the server holds none yet) and
    accumulates the gradient and its square. After the round, `moments` says what the centralised
    optimiser's state would be had it taken these K steps' gradients (their mean, and mean square, treated
    as stationary within the round): m = b1^K m + (1 - b1^K) mean(g), v = b2^K v + (1 - b2^K) mean(g^2),
    step = step + K. That is linear in the site's statistics, so the server's example-weighted average of
    the sites' replies is the same formula over the pooled gradients. Adam-family optimisers only (AdamW,
    LAMB: `exp_avg`, `exp_avg_sq`, `step`)."""

    def __init__(self, model: nn.Module, server: Mapping[str, torch.Tensor]) -> None:
        self.names = {param: name for name, param in model.named_parameters()}
        shapes = {name: param.shape for name, param in model.named_parameters()}
        self.frozen: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in server.items():  # the server's input: checked here, where the site reads it
            name, entry = split(key)
            expected = () if entry == "step" else shapes.get(name)
            if entry not in _ADAM or value.shape != expected or not torch.isfinite(value).all():
                raise ConfigError(f"the server's optimiser moments {key!r}: not an Adam state of this model")
            self.frozen.setdefault(name, {})[entry] = value.detach().clone()
        self.sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.counts: dict[str, int] = {}
        self.betas: dict[str, tuple[float, float]] = {}

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook `optimizer` (before its every step); its own state stops mattering."""
        for group in optimizer.param_groups:
            for param in group["params"]:
                self.betas[self.names[param]] = tuple(group["betas"])  # type: ignore[assignment]
        optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer: torch.optim.Optimizer, *_: object) -> None:
        for param, grad in stepping(optimizer):
            name, grad = self.names[param], grad.detach()
            held = self.frozen.get(name)
            if held is None:
                optimizer.state.pop(param, None)  # the optimiser starts it afresh, at every step
            else:
                device = param.device  # a step count stays on the CPU, as torch keeps it
                optimizer.state[param] = {
                    k: v.clone() if k == "step" else v.to(device, copy=True) for k, v in held.items()
                }
            total, squares = self.sums.setdefault(name, (torch.zeros_like(grad), torch.zeros_like(grad)))
            total.add_(grad)
            squares.addcmul_(grad, grad)
            self.counts[name] = self.counts.get(name, 0) + 1

    def moments(self, names: Collection[str]) -> dict[str, torch.Tensor]:
        """The state the centralised optimiser would hold after this round's steps, for every parameter in
        `names` that took at least one (`<name>/exp_avg`, `/exp_avg_sq`, `/step`)."""
        out = {}
        for name, (total, squares) in self.sums.items():
            if name not in names:
                continue
            k, (b1, b2) = self.counts[name], self.betas[name]
            held = self.frozen.get(name, {})
            m0 = held.get("exp_avg", torch.zeros_like(total)).to(total)
            v0 = held.get("exp_avg_sq", torch.zeros_like(total)).to(total)
            step0 = held.get("step", torch.zeros((), dtype=torch.float32))
            out[f"{name}{SEPARATOR}exp_avg"] = (b1**k * m0 + (1 - b1**k) * total / k).cpu()
            out[f"{name}{SEPARATOR}exp_avg_sq"] = (b2**k * v0 + (1 - b2**k) * squares / k).cpu()
            out[f"{name}{SEPARATOR}step"] = (step0.float() + k).reshape(()).cpu()
        return out
