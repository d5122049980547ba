"""Aggregation as pure functions: dicts of arrays and weights in, one dict out (no Flower, no I/O).

- `check_update`: the reason an update must be rejected (wrong keys, shapes or dtypes, NaN/Inf, a norm
  above the bound), or None.
- `average`: each key is averaged over the sites whose update holds it, weighted by their example counts,
  accumulated in float64 over updates sorted by site, then cast back. So the encoder is averaged over every
  participant while a task head is averaged only among the sites of that task. Integer buffers (BatchNorm's
  `num_batches_tracked`) are never averaged as floats: the largest count is kept.
- FedBN: `bn_keys` names BatchNorm parameters and buffers, which such sites keep local.
- FedAdam (Reddi et al. 2021): the averaged change is a pseudo-gradient for a server-side Adam step.
- `merge_metrics`: many sites' metric records as one (counts summed, times as median and max, every other
  value weighted by examples).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from torch import nn

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Update:
    site: str
    arrays: Arrays
    weight: float  # number of training examples
    # Keys under a prefix weighted by another count: a task head by that task's examples at this site.
    prefix_weights: dict[str, float] = field(default_factory=dict)

    def weight_of(self, key: str) -> float:
        return next((w for prefix, w in self.prefix_weights.items() if key.startswith(prefix)), self.weight)


@dataclass(frozen=True)
class Verdict:
    reason: str | None  # why the update is rejected, None if accepted
    norm: float | None  # its L2 distance from the reference, when its shapes allowed computing it


def check_update(
    arrays: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    required: Iterable[str],
    max_norm: float,
    examples: object,
) -> Verdict:
    """Whether `arrays` can be aggregated against the current global `reference`, and why not.

    Rejects unexpected or missing keys, wrong shapes or dtypes, NaN/Inf, a norm above `max_norm`, and an
    example count (the weight) that is missing, not finite or not positive. Never raises on bad input.
    """
    unexpected = sorted(set(arrays) - set(reference))
    if unexpected:
        return Verdict(f"unexpected keys, e.g. {unexpected[:2]}", None)
    missing = sorted(set(required) - set(arrays))
    if missing:
        return Verdict(f"missing keys, e.g. {missing[:2]}", None)
    for key, value in arrays.items():
        ref = reference[key]
        if value.shape != ref.shape:
            return Verdict(f"{key}: shape {value.shape} instead of {ref.shape}", None)
        if value.dtype != ref.dtype:
            return Verdict(f"{key}: dtype {value.dtype} instead of {ref.dtype}", None)
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return Verdict(f"{key}: holds NaN or Inf", None)
    norm = update_norm(arrays, reference)
    if norm > max_norm:
        return Verdict(f"update norm {norm:.3g} exceeds the bound {max_norm:.3g}", norm)
    if not isinstance(examples, int | float) or not np.isfinite(examples) or examples <= 0:
        return Verdict(f"num-examples is {examples!r}, not a positive count", norm)
    return Verdict(None, norm)


def average(updates: list[Update], reference: Mapping[str, np.ndarray]) -> Arrays:
    """Per-key weighted mean over the updates holding that key (with a positive weight for it); keys nobody
    sent keep the reference value."""
    ordered = sorted(updates, key=lambda u: u.site)
    out: Arrays = {}
    for key, ref in reference.items():
        holders = [(u, u.weight_of(key)) for u in ordered if key in u.arrays]
        holders = [(u, w) for u, w in holders if w > 0]
        if not holders:
            out[key] = ref
        elif not np.issubdtype(ref.dtype, np.floating):
            out[key] = np.max(np.stack([u.arrays[key] for u, _ in holders]), axis=0).astype(ref.dtype)
        else:
            total = sum(w for _, w in holders)
            acc = np.zeros(ref.shape, dtype=np.float64)
            for u, w in holders:
                acc += u.arrays[key].astype(np.float64) * (w / total)
            out[key] = acc.astype(ref.dtype)
    return out


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (arrays - reference) over the floating-point keys both hold."""
    total = 0.0
    for key, value in arrays.items():
        if key in reference and np.issubdtype(value.dtype, np.floating):
            diff = value.astype(np.float64) - reference[key].astype(np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return total**0.5


def cosine(
    arrays: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> float:
    """Cosine between a site's change and the aggregate's change (over the keys the site sent)."""
    dot = na = nb = 0.0
    for key, value in arrays.items():
        if key in reference and np.issubdtype(value.dtype, np.floating):
            a = (value.astype(np.float64) - reference[key]).ravel()
            b = (aggregate[key].astype(np.float64) - reference[key]).ravel()
            dot, na, nb = dot + float(a @ b), na + float(a @ a), nb + float(b @ b)
    return dot / (na * nb) ** 0.5 if na > 0 and nb > 0 else 0.0


BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")


def buffer_keys(keys: Iterable[str]) -> set[str]:
    """The state-dict keys that are BatchNorm buffers (statistics and counters), not parameters."""
    return {k for k in keys if k.rsplit(".", 1)[-1] in BUFFER_NAMES}


def bn_keys(model: nn.Module) -> set[str]:
    """State-dict keys of every BatchNorm (weights, biases, running statistics, counters)."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            prefix = f"{name}." if name else ""
            keys |= {prefix + k for k in module.state_dict()}
    return keys


@dataclass
class FedAdamState:
    m: Arrays
    v: Arrays
    step: int = 0


def fedadam(
    reference: Mapping[str, np.ndarray],
    averaged: Mapping[str, np.ndarray],
    state: FedAdamState | None,
    *,
    lr: float,
    buffers: Iterable[str] = (),
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> tuple[Arrays, FedAdamState]:
    """One server Adam step (Reddi et al. 2021) on the pseudo-gradient (averaged - reference) of the
    parameters. Buffers (BatchNorm running statistics and counters, named in `buffers`) and non-float keys
    take the plain average: an Adam step would move a variance by about `lr` whatever it should be."""
    plain = set(buffers)
    if state is None:
        state = FedAdamState({}, {})
    out: Arrays = {}
    for key, ref in reference.items():
        if key in plain or not np.issubdtype(ref.dtype, np.floating):
            out[key] = averaged[key]
            continue
        delta = averaged[key].astype(np.float64) - ref.astype(np.float64)
        m = beta1 * state.m.get(key, np.zeros_like(delta)) + (1 - beta1) * delta
        v = beta2 * state.v.get(key, np.zeros_like(delta)) + (1 - beta2) * delta * delta
        state.m[key], state.v[key] = m, v
        out[key] = (ref.astype(np.float64) + lr * m / (np.sqrt(v) + tau)).astype(ref.dtype)
    state.step += 1
    return out, state


def merge_metrics(
    rows: Iterable[Mapping[str, float]],
    weight_key: str,
    *,
    summed: Collection[str] = (),
    timed: Collection[str] = (),
) -> dict[str, float]:
    """One record from many sites' metrics: keys in `summed` (counts, `weight_key` among them if listed)
    add up, keys in `timed` become `<key>-median` and `<key>-max`, and every other number is the mean
    weighted by `weight_key` (rows without a positive weight and NaN values left out).

    >>> merge_metrics([{"n": 1, "loss": 1.0, "s": 4.0}, {"n": 3, "loss": 2.0, "s": 2.0}], "n",
    ...               summed={"n"}, timed={"s"})
    {'n': 4.0, 'loss': 1.75, 's-median': 3.0, 's-max': 4.0}
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    for row in rows:
        w = float(row.get(weight_key, 0.0))
        for key, value in row.items():
            if not isinstance(value, int | float) or math.isnan(value):
                continue
            if key in summed:
                sums[key], weights[key] = sums.get(key, 0.0) + float(value), 1.0
            elif key in timed:
                times.setdefault(key, []).append(float(value))
            elif key != weight_key and w > 0:
                sums[key] = sums.get(key, 0.0) + w * float(value)
                weights[key] = weights.get(key, 0.0) + w
    out = {k: sums[k] if k in summed else sums[k] / weights[k] for k in sums if weights[k] > 0}
    for key, values in times.items():
        out |= {f"{key}-median": statistics.median(values), f"{key}-max": max(values)}
    return out
