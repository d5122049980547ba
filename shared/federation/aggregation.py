"""Aggregation as pure functions: dicts of arrays and weights in, one dict out (no Flower, no I/O).

- `check_update`: the reason an update must be rejected (wrong keys, shapes or dtypes, NaN/Inf, a negative
  variance, a parameter-update norm above the bound), or None; `check_moments` the same for the optimiser
  moments a site hands on under cyclic weight transfer with `federation.carry_optimizer`.
- `RunningAverage` (and `average`, the same over a list): each key is averaged over the sites whose update
  holds it, weighted by their example counts. Updates are folded in one at a time, as replies arrive, into
  exact order-independent sums (`shared/federation/exactsum.py`) and can be dropped at once: the result is
  the same bit for bit whatever the order, and the server's memory does not grow with the number of sites. So
  the encoder is averaged over every participant while a task head is averaged only among the sites of that
  task. Integer buffers (BatchNorm's `num_batches_tracked`) are never averaged as floats: the largest count
  is kept.
- `Sketches`: each reply's change in a 4,096-bucket count sketch, kept after the reply is dropped, from which
  its cosine with the round's aggregate change is estimated (error about 1/64 in the cosine).
- FedBN: `bn_keys` names BatchNorm parameters and buffers, which such sites keep local.
- FedAdam (Reddi et al. 2021): the averaged change is a pseudo-gradient for a server-side Adam step.
- Cyclic weight transfer (Chang et al. 2018): `cycle_order` is the seeded order in which a round's sites
  train one after another, each from the model (and, with `carry_optimizer`, the optimiser moments) the
  previous one returned (`Chain`).
- `merge_metrics`: many sites' metric records as one (counts summed, times as median and max, every other
  value weighted by examples).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
from torch import nn

from shared.federation.exactsum import MAX_WEIGHT, ExactSum
from shared.federation.wire import NUM_EXAMPLES, task_key
from shared.models import head_prefix
from shared.seeding import derive_seed
from shared.training.moments import SEPARATOR, split

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


def site_update(site: str, arrays: Arrays, metrics: Mapping, tasks: Mapping[str, int]) -> Update:
    """A site's train reply as an update to aggregate: weighted by its examples, each task head by that
    task's examples at the site."""
    heads = {head_prefix(t): float(metrics.get(task_key(t, NUM_EXAMPLES), 0)) for t in tasks}
    return Update(site, arrays, float(metrics[NUM_EXAMPLES]), heads)


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
        if key.endswith(".running_var") and (value < 0).any():
            return Verdict(f"{key}: a negative variance", None)
    norm = update_norm(arrays, reference)
    if norm > max_norm:
        return Verdict(f"update norm {norm:.3g} exceeds the bound {max_norm:.3g}", norm)
    if not _whole_count(examples):
        return Verdict(f"num-examples is {examples!r}, not a positive whole count below 2^26", norm)
    return Verdict(None, norm)


def check_moments(
    moments: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], entries: Collection[str]
) -> str | None:
    """Why a site's optimiser moments (`shared/training/moments.py`) cannot be handed on to the next site,
    or None. Each parameter named must be one of the model's, with exactly the optimiser's `entries` (one
    missing would fail the next site's first step): finite floats of the parameter's shape and dtype (a
    step count: one float), second moments and step counts not negative."""
    held: dict[str, set[str]] = {}
    for key, value in moments.items():
        name, entry = split(key)
        held.setdefault(name, set()).add(entry)
        ref = reference.get(name)
        if ref is None or not _learnt(name, ref):
            return f"optimiser moments {key}: {name!r} is no parameter of the model"
        step = entry == "step"
        expected = () if step else ref.shape
        if value.shape != expected:
            return f"optimiser moments {key}: shape {value.shape} instead of {expected}"
        if not np.issubdtype(value.dtype, np.floating) or (not step and value.dtype != ref.dtype):
            return f"optimiser moments {key}: dtype {value.dtype}, not the parameter's {ref.dtype}"
        if not np.isfinite(value).all():
            return f"optimiser moments {key}: holds NaN or Inf"
        if entry in ("step", "exp_avg_sq") and (value < 0).any():
            return f"optimiser moments {key}: negative"
    for name, found in held.items():
        if found != set(entries):
            return f"optimiser moments of {name}: entries {sorted(found)} instead of {sorted(entries)}"
    return None


def moments_start(
    reference: Mapping[str, np.ndarray], previous: Mapping[str, np.ndarray], entries: Collection[str]
) -> Arrays:
    """The server's per-parameter state before a round's replies are averaged in: `previous` where held,
    else a fresh one (zeros; a step count 0) of each of `entries` for every parameter of `reference`
    (MimeLite's Adam moments, SCAFFOLD's control variate). A parameter no site trains this round keeps
    what it had."""
    out: Arrays = {}
    for name, value in reference.items():
        if not _learnt(name, value):
            continue
        for entry in sorted(entries):
            fresh = np.zeros((), np.float32) if entry == "step" else np.zeros_like(value)
            key = f"{name}{SEPARATOR}{entry}"
            out[key] = previous.get(key, fresh)
    return out


class RunningAverage:
    """Per-key weighted mean of updates folded in one at a time (the update can be dropped after `add`):
    float keys through exact sums of weight x value, integer keys as their running maximum. Keys nobody
    sent (with a positive weight) keep the reference value. Weights must be whole counts (example counts)."""

    def __init__(self, reference: Mapping[str, np.ndarray]) -> None:
        self.reference = reference
        self.sums: dict[str, ExactSum] = {}
        self.weights: dict[str, float] = {}
        self.maxima: Arrays = {}

    def add(self, update: Update) -> None:
        for key, value in update.arrays.items():
            ref, weight = self.reference[key], update.weight_of(key)
            if weight <= 0:
                continue
            if not np.issubdtype(ref.dtype, np.floating):
                kept = self.maxima.get(key)
                self.maxima[key] = value.copy() if kept is None else np.maximum(kept, value)
                continue
            self.sums.setdefault(key, ExactSum(ref.shape)).add(value, weight)
            self.weights[key] = self.weights.get(key, 0.0) + weight

    def result(self) -> Arrays:
        out: Arrays = {}
        for key, ref in self.reference.items():
            if key in self.maxima:
                out[key] = self.maxima[key].astype(ref.dtype)
            elif key in self.sums:
                out[key] = (self.sums[key].total() / self.weights[key]).astype(ref.dtype)
            else:
                out[key] = ref
        return out


def average(updates: Iterable[Update], reference: Mapping[str, np.ndarray]) -> Arrays:
    """`RunningAverage` over `updates` (in any order: the result is the same bit for bit)."""
    running = RunningAverage(reference)
    for update in updates:
        running.add(update)
    return running.result()


def check_scores(metrics: Mapping[str, object], tasks: Iterable[str]) -> str | None:
    """Why a site's evaluation reply (validation or final test) cannot be recorded, or None: each task's
    image count must be 0 or a whole count below 2^26, and no score infinite (NaN is a task the site does
    not hold)."""
    for task in tasks:
        count = metrics.get(task_key(task, NUM_EXAMPLES), 0)
        if count != 0 and not _whole_count(count):
            return f"{task_key(task, NUM_EXAMPLES)} is {count!r}, not a whole count of images below 2^26"
    for key, value in metrics.items():
        if not isinstance(value, int | float) or math.isinf(value):
            return f"{key} is {value!r}, not a finite score"
    return None


def _whole_count(examples: object) -> bool:
    return (
        isinstance(examples, int | float)
        and np.isfinite(examples)
        and float(examples).is_integer()
        and 0 < examples < MAX_WEIGHT
    )


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (arrays - reference) over the parameters both hold. BatchNorm statistics are left out:
    behind a scale-invariant layer the weights (and so the variances) may grow freely while the function
    does not change (measured: a healthy SparK decoder's running variances moved by 1e6 in one round)."""
    total = 0.0
    for key, value in arrays.items():
        if key in reference and _learnt(key, value):
            diff = value.astype(np.float64) - reference[key].astype(np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return total**0.5


SKETCH_BUCKETS = 4096
Sketch = dict[str, tuple[np.ndarray, float]]  # per key group: (count sketch of the change, its squared norm)


class Sketches:
    """Count sketches (Charikar et al. 2002) of updates' changes from the reference, per key group, so a
    reply's cosine with the aggregate change can be estimated after the reply itself is dropped.

    Each float key's elements are hashed to one of `buckets` buckets with a random sign (seeded by the key's
    name, the same for every site); a sketch's inner product estimates the changes' inner product without
    bias, with a standard error of about |a| |b| / sqrt(buckets). Norms are exact. Groups are the encoder
    (and anything else) and each task head, so a site is compared only on the keys it sent."""

    def __init__(self, reference: Mapping[str, np.ndarray], buckets: int = SKETCH_BUCKETS) -> None:
        if not 0 < buckets <= 2**16:
            raise ValueError(f"buckets={buckets}: between 1 and 65536 (bucket ids are uint16)")
        self.reference, self.buckets = reference, buckets
        self.hashes: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def sketch(self, arrays: Mapping[str, np.ndarray]) -> Sketch:
        """{group: (sketch (buckets,), squared norm of the change)} over the float keys of `arrays`."""
        out: Sketch = {}
        for key, value in arrays.items():
            ref = self.reference.get(key)
            if ref is None or not _learnt(key, value):
                continue
            change = (value.astype(np.float64) - ref.astype(np.float64)).ravel()
            bucket, sign = self._hash(key, change.size)
            vec, sq = out.get(_group(key), (np.zeros(self.buckets), 0.0))
            vec += np.bincount(bucket, weights=sign * change, minlength=self.buckets)
            out[_group(key)] = (vec, sq + float(change @ change))
        return out

    def _hash(self, key: str, size: int) -> tuple[np.ndarray, np.ndarray]:
        if key not in self.hashes:
            rng = np.random.default_rng(list(key.encode()))
            bucket = rng.integers(0, self.buckets, size).astype(np.uint16)  # small: kept for the round
            self.hashes[key] = (bucket, rng.choice(np.array([-1, 1], dtype=np.int8), size))
        return self.hashes[key]


def sketched_cosine(
    site: dict[str, tuple[np.ndarray, float]], aggregate: dict[str, tuple[np.ndarray, float]]
) -> float:
    """The estimated cosine between a site's change and the aggregate's, over the groups the site sent."""
    groups = [g for g in site if g in aggregate]
    dot = sum(float(site[g][0] @ aggregate[g][0]) for g in groups)
    na, nb = sum(site[g][1] for g in groups), sum(aggregate[g][1] for g in groups)
    return float(np.clip(dot / (na * nb) ** 0.5, -1.0, 1.0)) if na > 0 and nb > 0 else 0.0


def _group(key: str) -> str:
    """A task head's keys form its own group (`heads.<task>`); everything else is one group."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "heads" and len(parts) > 2 else ""


BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")


def _learnt(key: str, value: np.ndarray) -> bool:
    """A floating-point parameter, not a BatchNorm statistic: what update norms and cosines are taken over."""
    return np.issubdtype(value.dtype, np.floating) and key.rsplit(".", 1)[-1] not in BUFFER_NAMES


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


class Chain:
    """One round of cyclic weight transfer: each accepted site's weights become the model the next site
    trains from (its entries; heads it does not hold stay as they were), while the BatchNorm statistics
    the round ends with are the sites' running statistics averaged as FedAvg averages them. Chained too,
    they would be the last site's alone, which under camera skew cost the other camera's test images
    (seed 0: referable AUC 0.776 on camera 1, 0.861 with the average). Training never reads them (batches
    normalise with their own), so only the model the round hands on changes.

    With `federation.carry_optimizer` the optimiser moments are chained too, for the parameters the chain
    takes from the site: those of a head the site holds no examples of (which DP-SGD's noise still moves)
    stay the previous holder's."""

    def __init__(self, start: Arrays, moments: Arrays | None = None) -> None:
        self.model = start
        self.moments = dict(moments or {})
        self.statistics = RunningAverage(start)
        self.buffers = buffer_keys(start)

    def add(self, update: Update, moments: Arrays | None = None) -> None:
        # The site's entries as they are (one update's average is itself); those it holds no examples of
        # (a head of a task it lacks) stay, as `average` leaves them
        sent = {k: v for k, v in update.arrays.items() if update.weight_of(k) > 0}
        self.model = {k: sent.get(k, v) for k, v in self.model.items()}
        self.moments |= {k: v for k, v in (moments or {}).items() if split(k)[0] in sent}
        own = {k: v for k, v in update.arrays.items() if k in self.buffers}
        self.statistics.add(replace(update, arrays=own))

    def result(self) -> Arrays:
        averaged = self.statistics.result()
        return {k: averaged[k] if k in self.buffers else v for k, v in self.model.items()}


def cycle_order(names: Iterable[str], run_seed: int, phase: str, rnd: int) -> list[str]:
    """A round's sites in the order cyclic weight transfer trains them: sorted by a key seeded per (round,
    site), so the order changes every round (no site is always last, the one the model remembers best) and
    any subset of the sites keeps its relative order (a replay of the sites that were aggregated)."""
    return sorted(names, key=lambda name: derive_seed(run_seed, "cycle", phase, rnd, name))


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
