"""Optimiser moments handed from one model to another by parameter name (cyclic weight transfer with
`federation.carry_optimizer`): a model that continues from them steps exactly as the uninterrupted run,
although its parameters sit at other positions in its optimiser; parameters they do not name keep the
receiving optimiser's own state."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from shared.training.moments import named_moments, with_moments


class Net(nn.Module):
    """An encoder and one head per task, the heads in the given order (so in the optimiser's order)."""

    def __init__(self, heads: tuple[str, ...]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(8, 3) for t in heads})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](self.encoder(x))


def train(model: Net, optimizer: torch.optim.Optimizer, seed: int, task: str = "dr", steps: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x, task), y).backward()
        optimizer.step()


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.01)


def test_a_site_that_continues_from_carried_moments_steps_as_the_uninterrupted_run() -> None:
    first = Net(("dr",))
    optimizer = adamw(first)
    train(first, optimizer, seed=1)
    moments, weights = named_moments(first, optimizer), copy.deepcopy(first.state_dict())
    assert set(moments) == {
        f"{name}/{e}" for name, _ in first.named_parameters() for e in ("step", "exp_avg", "exp_avg_sq")
    }
    assert set(named_moments(first, optimizer, {"heads.dr.bias"})) == {
        f"heads.dr.bias/{e}" for e in ("step", "exp_avg", "exp_avg_sq")
    }  # a site sends the moments of the parameters it sends
    train(first, optimizer, seed=2)  # the uninterrupted run

    second = Net(("amd", "dr"))  # the DR head's parameters sit two places later in its optimiser
    second.load_state_dict(weights, strict=False)
    own = adamw(second)
    train(second, own, seed=3, task="amd", steps=1)  # the site's own state: its AMD head's moments
    amd = {k: v.clone() for k, v in named_moments(second, own).items() if k.startswith("heads.amd.")}
    second.load_state_dict(weights, strict=False)  # the encoder back to the handed-on weights
    resumed = adamw(second)
    resumed.load_state_dict(with_moments(own, second, moments))
    train(second, resumed, seed=2)

    state = second.state_dict()
    for key, value in first.state_dict().items():
        assert torch.equal(state[key], value), key  # bit for bit
    kept = named_moments(second, resumed)
    assert all(torch.equal(kept[k], v) for k, v in amd.items())  # not named: the site's own state stays

    afresh = Net(("amd", "dr"))
    afresh.load_state_dict(weights, strict=False)
    train(afresh, adamw(afresh), seed=2)  # what a site without the moments would do
    assert not torch.equal(afresh.state_dict()["encoder.0.weight"], first.state_dict()["encoder.0.weight"])
