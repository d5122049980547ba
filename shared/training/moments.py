"""An optimiser's per-parameter state keyed by parameter name: what cyclic weight transfer with
`federation.carry_optimizer` hands from site to site along with the model.

torch keys an optimiser's `state_dict()` by each parameter's position in its groups, and positions depend
on which task heads a site's model holds; names do not. Every tensor entry of a parameter's state travels
(AdamW and LAMB: `exp_avg`, `exp_avg_sq`, `step`; SGD: `momentum_buffer`) as `<parameter name>/<entry>`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import nn

SEPARATOR = "/"
_ADAM = frozenset({"step", "exp_avg", "exp_avg_sq"})
ENTRIES = {"adamw": _ADAM, "lamb": _ADAM, "sgd": frozenset({"momentum_buffer"})}  # per optimiser name


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
