"""Privacy accounting: epsilon of everything a data holder released, and the noise for a planned run.

A mechanism is (noise multiplier sigma, sample rate q, steps): `steps` Poisson-subsampled Gaussian steps.
Epsilon always composes the WHOLE history with Opacus's RDP accountant (the default PRV accountant can fail
to compute epsilon for some histories, opacus#591), so a round's epsilon is never "this round's" epsilon.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

Mechanism = tuple[float, float, int]  # (sigma, sample rate, steps)
SIGMA_MAX = 1e3  # beyond this no useful training happens: a budget needing more is spent


def epsilon(history: Sequence[Mechanism], delta: float) -> float:
    """(epsilon at `delta`) of all of `history` composed; 0 for no steps, inf for a step without noise."""
    steps = [(float(s), float(q), int(n)) for s, q, n in history if n > 0 and q > 0]
    if not steps:
        return 0.0
    if any(s <= 0 for s, _, _ in steps):
        return math.inf
    from opacus.accountants import RDPAccountant  # here: a site without DP never pays opacus's import

    accountant = RDPAccountant()
    accountant.history = steps
    with warnings.catch_warnings():  # "optimal order is the largest alpha": a loose but valid bound
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta=delta))


def noise_for(
    target: float, delta: float, spent: Sequence[Mechanism], plan: Sequence[tuple[float, int]]
) -> float | None:
    """The smallest sigma (to 1%) with which `plan` [(q, steps)] after `spent` ends at most at `target`
    epsilon; None when even SIGMA_MAX would exceed it (the budget is spent)."""

    def total(sigma: float) -> float:
        return epsilon([*spent, *((sigma, q, n) for q, n in plan)], delta)

    if total(SIGMA_MAX) > target:
        return None
    low, high = 0.0, 1.0
    while total(high) > target:
        low, high = high, high * 2
    while high - low > 0.01 * high:
        middle = (low + high) / 2
        low, high = (low, middle) if total(middle) <= target else (middle, high)
    return high


def group_bound(eps: float, delta: float, k: int) -> tuple[float, float]:
    """(epsilon, delta) for a group of k records from (eps, delta) for one: (k eps, k e^((k-1) eps) delta)."""
    if k <= 1:
        return eps, delta
    return k * eps, min(1.0, k * math.exp(min((k - 1) * eps, 700.0)) * delta)
