"""The strategies, each one object in one registry: what it asks of the config, of a site and of the server,
and what it can run under. No other module compares a strategy's name: they ask its object.

A strategy is the sum of its parts:
- at the server: how a round's accepted replies make the new model: their weighted average (folded in as
  they land, one reply in memory at a time), a server optimiser's `step` along that average (FedAdam,
  FedAvgM), a robust `combine` of every reply held together (the trimmed mean), or, `sequential`, a chain
  in which each site trains from the previous one's model (cyclic weight transfer);
- at a site: whether it keeps its BatchNorm layers to itself (`local_batchnorm`, FedBN), adds a
  proximal term to its loss (`proximal`, FedProx), steps with the server's optimiser state held fixed
  through the round, sending back what its gradients would make of it (`server_moments`, MimeLite), or
  corrects every gradient by the server's control variate minus its own (`control_variates`, SCAFFOLD);
- what it can run under: secure aggregation (the server sees only the sum, so it cannot hold replies or
  chain them), DP-SGD (FedProx's term bypasses the per-unit clipping), the replay audit
  (`simulation/replay.py`: server optimisers keep a state the store does not hold), handing the optimiser's
  moments on with the model (`carry_optimizer`, only along a chain).

Adding one (FedYogi, a coordinate median, a client-side method) is one entry here and its tests. The maths
of the server-side steps lives here too: numpy on dicts of arrays, nothing else imported, so the config
layer can check a run's settings against the registry.

    >>> STRATEGIES["trimmed-mean"].holds_replies, bool(STRATEGIES["trimmed-mean"].not_secure)
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

Arrays = dict[str, np.ndarray]


class Held(Protocol):
    """One accepted reply as the server holds it (`shared/federation/aggregation.py:Update`)."""

    arrays: Arrays

    def weight_of(self, key: str) -> float: ...


@dataclass
class ServerMoments:
    """The server optimiser's state across rounds: FedAdam's moments m and v, or FedAvgM's momentum (m)."""

    m: Arrays
    v: Arrays
    step: int = 0


@dataclass(frozen=True)
class Strategy:
    """A federated strategy: see the module docstring for what each part means."""

    name: str
    summary: str
    sequential: bool = False
    local_batchnorm: bool = False
    proximal: bool = False
    step: Callable[..., tuple[Arrays, ServerMoments]] | None = None  # (reference, average, state, f, buffers)
    combine: Callable[[Sequence[Held], Mapping[str, np.ndarray], Any], Arrays] | None = None
    default_server_lr: float = 1.0
    not_secure: str = ""  # why it cannot run under secure aggregation ("": it can)
    not_private: str = ""  # why it cannot run under DP-SGD ("": it can)
    replayable: bool = True
    carries_optimizer: bool = False
    server_moments: bool = False
    control_variates: bool = False

    @property
    def server_state(self) -> bool:
        """The server holds a per-parameter state it sends with the model and rebuilds each round as the
        example-weighted average of what the sites return: MimeLite's moments, SCAFFOLD's control variate."""
        return self.server_moments or self.control_variates

    def moments_travel(self, federation: Any) -> bool:
        """Per-parameter state goes out with the model and comes back with the update: the server's
        (MimeLite, SCAFFOLD), or the chain's optimiser moments (cyclic with `carry_optimizer`)."""
        return self.server_state or (self.carries_optimizer and federation.carry_optimizer)

    @property
    def holds_replies(self) -> bool:
        """The server keeps every accepted reply of a round in memory (N x the model), not a running sum."""
        return self.combine is not None

    def problems(self, federation: Any, private: bool) -> list[tuple[str, str]]:
        """(key, why) for each setting of `federation` (a FederationConfig) this strategy cannot run with;
        `private`: the run trains with DP-SGD."""
        out = []
        if federation.secure_aggregation and self.not_secure:
            out.append(
                ("secure_aggregation", f"{self.not_secure}; use strategy fedavg with secure aggregation")
            )
        if federation.carry_optimizer and not self.carries_optimizer:
            out.append(
                (
                    "carry_optimizer",
                    f"the optimiser travels along the chain of strategy cyclic, not {self.name}; set "
                    "strategy: cyclic or carry_optimizer: false",
                )
            )
        if private and self.not_private:
            out.append(("strategy", f"{self.not_private}; use fedavg or fedadam"))
        return out

    def server_lr(self, federation: Any) -> float:
        """The server optimiser's lr: the run's `server_lr`, or this strategy's default."""
        return federation.server_lr or self.default_server_lr


# ------------------------------------------------------------------------------------- server steps
def fedadam(
    reference: Mapping[str, np.ndarray],
    averaged: Mapping[str, np.ndarray],
    state: ServerMoments | None,
    *,
    lr: float,
    buffers: Iterable[str] = (),
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> tuple[Arrays, ServerMoments]:
    """One server Adam step (Reddi et al. 2021) on the pseudo-gradient (averaged - reference) of the
    parameters. Buffers (BatchNorm running statistics and counters, named in `buffers`) and non-float keys
    take the plain average: an Adam step would move a variance by about `lr` whatever it should be."""

    def step(state: ServerMoments, key: str, delta: np.ndarray) -> np.ndarray:
        m = beta1 * state.m.get(key, np.zeros_like(delta)) + (1 - beta1) * delta
        v = beta2 * state.v.get(key, np.zeros_like(delta)) + (1 - beta2) * delta * delta
        state.m[key], state.v[key] = m, v
        return lr * m / (np.sqrt(v) + tau)

    return _server_move(reference, averaged, state, buffers, step)


def fedavgm(
    reference: Mapping[str, np.ndarray],
    averaged: Mapping[str, np.ndarray],
    state: ServerMoments | None,
    *,
    lr: float,
    momentum: float,
    buffers: Iterable[str] = (),
) -> tuple[Arrays, ServerMoments]:
    """One server SGD step with momentum (FedAvgM, Hsu et al. 2019) along the round's average change:
    m = momentum * m + (averaged - reference), new = reference + lr * m. With lr 1 and momentum 0 it is
    FedAvg. Buffers and non-float keys take the plain average, as in `fedadam`."""

    def step(state: ServerMoments, key: str, delta: np.ndarray) -> np.ndarray:
        state.m[key] = momentum * state.m.get(key, np.zeros_like(delta)) + delta
        return lr * state.m[key]

    return _server_move(reference, averaged, state, buffers, step)


def _server_move(
    reference: Mapping[str, np.ndarray],
    averaged: Mapping[str, np.ndarray],
    state: ServerMoments | None,
    buffers: Iterable[str],
    step: Callable[[ServerMoments, str, np.ndarray], np.ndarray],
) -> tuple[Arrays, ServerMoments]:
    """reference + step(state, key, averaged - reference) in float64 for every float parameter (the server
    optimiser's move along the pseudo-gradient, its state fresh on the first round and counted on every
    one); buffers and non-float keys take the plain average."""
    state = state or ServerMoments({}, {})
    plain = set(buffers)
    out: Arrays = {}
    for key, ref in reference.items():
        if key in plain or not np.issubdtype(ref.dtype, np.floating):
            out[key] = averaged[key]
            continue
        delta = averaged[key].astype(np.float64) - ref.astype(np.float64)
        out[key] = (ref.astype(np.float64) + step(state, key, delta)).astype(ref.dtype)
    state.step += 1
    return out, state


def _adam_step(reference, average, state, federation, buffers):  # type: ignore[no-untyped-def]
    return fedadam(reference, average, state, lr=STRATEGIES["fedadam"].server_lr(federation), buffers=buffers)


def _momentum_step(reference, average, state, federation, buffers):  # type: ignore[no-untyped-def]
    lr = STRATEGIES["fedavgm"].server_lr(federation)
    return fedavgm(reference, average, state, lr=lr, momentum=federation.server_momentum, buffers=buffers)


# ---------------------------------------------------------------------------------- robust combine
def trimmed_mean(updates: Sequence[Held], reference: Mapping[str, np.ndarray], trim: float) -> Arrays:
    """The coordinate-wise trimmed mean (Yin et al. 2018) of the sites that hold each key: per coordinate,
    the `floor(trim x n)` largest and smallest of the n sites' values are dropped and the rest averaged
    (unweighted: a forged example count buys a site nothing). A site that sends bad-but-valid values (within
    every bound the server checks) moves the result only as far as an honest site's value. Integer keys
    (BatchNorm's counters) take their maximum, as in the average; keys nobody holds keep the reference."""
    out: Arrays = {}
    for key, ref in reference.items():
        held = [u.arrays[key] for u in updates if key in u.arrays and u.weight_of(key) > 0]
        if not held:
            out[key] = ref
        elif not np.issubdtype(ref.dtype, np.floating):
            out[key] = np.max(np.stack(held), axis=0).astype(ref.dtype)
        else:
            values = np.sort(np.stack(held).astype(np.float64), axis=0)
            cut = trimmed_count(len(held), trim)
            out[key] = values[cut : len(held) - cut].mean(axis=0).astype(ref.dtype)
    return out


def trimmed_count(n: int, trim: float) -> int:
    """How many values the trimmed mean drops at each end, of n: floor(trim x n), always leaving one."""
    return min(math.floor(trim * n), (n - 1) // 2)


def _trimmed(updates, reference, federation):  # type: ignore[no-untyped-def]
    return trimmed_mean(updates, reference, federation.trim_fraction)


# --------------------------------------------------------------------------------------- registry
_AVERAGING = "the weighted average of the sites' models (McMahan et al. 2017)"
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("fedavg", f"FedAvg: {_AVERAGING}"),
        Strategy(
            "fedprox",
            "FedProx: sites add mu/2 ||w - w_global||^2 to their loss (Li et al. 2020); the server averages",
            proximal=True,
            not_private="FedProx's term bypasses the per-sample clipping",
        ),
        Strategy(
            "fedbn",
            "FedBN: sites keep their own BatchNorm layers (Li et al. 2021); the server averages the rest",
            local_batchnorm=True,
        ),
        Strategy(
            "fedadam",
            "FedAdam: a server Adam step along the round's average change (Reddi et al. 2021)",
            step=_adam_step,
            default_server_lr=0.01,
            replayable=False,
        ),
        Strategy(
            "fedavgm",
            "FedAvgM: a server SGD step with momentum along the round's average change (Hsu et al. 2019)",
            step=_momentum_step,
            replayable=False,
        ),
        Strategy(
            "mime",
            "MimeLite: every site steps with the server's Adam moments, unchanged through the round, and the "
            "server moves them as the centralised optimiser would with the round's pooled gradients "
            "(Karimireddy et al. 2021); 3x FedAvg's bytes",
            server_moments=True,
            not_secure="the moments travel beside the masked sum (their secure aggregation is not built yet)",
            replayable=False,
        ),
        Strategy(
            "scaffold",
            "SCAFFOLD: every local gradient is corrected by the server's control variate minus the site's "
            "own: the mean gradient the site saw in its last round, and the average of those the server "
            "received (Karimireddy et al. 2020); 2x FedAvg's bytes",
            control_variates=True,
            not_secure="the control variates travel beside the masked sum (their secure aggregation is not "
            "built yet)",
            not_private="a control variate is the mean of the site's unclipped, unnoised gradients",
            replayable=False,
        ),
        Strategy(
            "trimmed-mean",
            "trimmed mean: per coordinate, the largest and smallest sites' values dropped, the rest averaged "
            "(Yin et al. 2018): for a site that may send bad-but-valid updates",
            combine=_trimmed,
            not_secure="the trimmed mean needs every site's own update, which secure aggregation hides",
        ),
        Strategy(
            "cyclic",
            "cyclic weight transfer: the round's sites train one after another, each from the previous one's "
            "model (Chang et al. 2018)",
            sequential=True,
            not_secure="cyclic weight transfer passes each site's own model on: no sum to hide it in",
            carries_optimizer=True,
        ),
    )
}


def strategy_of(name: str) -> Strategy:
    """The registered strategy `name` (a KeyError for any other: the config refuses unknown names)."""
    return STRATEGIES[name]
