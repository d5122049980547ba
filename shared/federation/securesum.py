"""What a site puts through secure aggregation (SecAgg+), and how the server reads the sum back.

SecAgg+ gives the server only the mean of the vectors the sites sent, each entry quantised within
+/- `clipping_range`. Our averages need more than one mean: the encoder is weighted by each site's
examples, a task head by that task's examples at the site (zero where the site lacks the task). So each
site sends, for its float entries, (its weight / scale) x (its change from the round's global model), and
for each weight group one entry holding (its weight / scale); the server multiplies the mean by the number
of sites to get the sums, and divides each entry's sum by its group's summed weight. That is the plain
weighted average of `shared/federation/aggregation.py` up to the quantisation (a step of 2 x clipping_range /
2^22, rounded stochastically, per site).

`scale` is the largest example count among the round's sites (the server knows each site's counts), so
every weight entry is at most 1. Integer buffers (BatchNorm's `num_batches_tracked`) do not go through the
sum: the server advances them by the round's largest step count, which is what the plain average's maximum
gives for our models. Keys a site keeps local (FedBN's) are not sent and keep the server's values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from shared.errors import UserError
from shared.federation.aggregation import Arrays, Update
from shared.federation.strategies import strategy_of
from shared.federation.wire import RoundSpec
from shared.models import head_prefix

QUANTIZATION_LEVELS = 2**22  # Flower's default `quantization_range`
# Why a site sent zeros (the wire's SECAGG_REFUSAL metric; 0: it trained): the server records the reason.
REFUSED_BUDGET, REFUSED_RANGE = 1, 2
REFUSALS = {
    REFUSED_BUDGET: "refused by the site: its privacy budget",
    REFUSED_RANGE: "refused by the site: its update is outside the secure-aggregation range (see its log)",
}


class OutOfRange(UserError):
    """A site's scaled update would leave the clipping range: SecAgg+ would clip it silently."""


@dataclass(frozen=True)
class SecureLayout:
    """Which entries a round's secure vector holds, in which order, and how they are scaled."""

    keys: tuple[str, ...]  # the float entries sent, sorted
    shapes: tuple[tuple[int, ...], ...]
    groups: tuple[str, ...]  # weight groups: "" (the site's examples), then each task head's prefix
    scale: float  # examples per unit of weight
    clip: float  # SecAgg+'s clipping_range

    @classmethod
    def of(
        cls,
        reference: Mapping[str, np.ndarray],
        heads: list[str],
        local: set[str],
        scale: float,
        clip: float,
    ) -> SecureLayout:
        keys = tuple(
            sorted(k for k, v in reference.items() if np.issubdtype(v.dtype, np.floating) and k not in local)
        )
        return cls(keys, tuple(reference[k].shape for k in keys), ("", *heads), float(scale), float(clip))

    @property
    def size(self) -> int:
        return len(self.groups) + sum(int(np.prod(s)) for s in self.shapes)

    def group_of(self, key: str) -> int:
        return next((i for i, p in enumerate(self.groups) if p and key.startswith(p)), 0)

    def encode(self, update: Update, reference: Mapping[str, np.ndarray]) -> np.ndarray:
        """The site's vector: group weights, then weighted changes; OutOfRange when an entry would be
        clipped. Keys the update lacks (heads of tasks the site does not hold) weigh 0."""
        weights = [update.weight if not p else update.prefix_weights.get(p, 0.0) for p in self.groups]
        parts = [np.asarray(weights, dtype=np.float64) / self.scale]
        for key in self.keys:
            w = weights[self.group_of(key)] if key in update.arrays else 0.0
            if w:
                change = update.arrays[key].astype(np.float64) - reference[key]
                parts.append(np.ravel(change) * (w / self.scale))
            else:
                parts.append(np.zeros(reference[key].size))
        vector = np.concatenate(parts)
        largest = float(np.abs(vector).max(initial=0.0))
        if largest > self.clip:
            raise OutOfRange(
                f"this site's weighted update reaches {largest:.3g}, beyond secure aggregation's "
                f"clipping range {self.clip:g}; raise federation.secagg_clipping_range (each step of "
                f"the sum is then coarser: {2 * self.clip / QUANTIZATION_LEVELS:.2g} now)"
            )
        return vector

    def decode(self, mean: np.ndarray, sites: int, reference: Mapping[str, np.ndarray], steps: int) -> Arrays:
        """The new global weights from SecAgg+'s mean over `sites` vectors; a group nobody weighted (and
        every key not sent) keeps the reference, integer buffers advance by `steps`."""
        if mean.shape != (self.size,):
            raise ValueError(f"secure sum of {mean.shape} entries, expected {self.size}")
        total = mean.astype(np.float64) * sites
        weight = total[: len(self.groups)]
        held = weight > 0.5 / self.scale  # at least one example (zeros come back exact)
        sums, offset = {}, len(self.groups)
        for key, shape in zip(self.keys, self.shapes, strict=True):
            n = int(np.prod(shape))
            sums[key] = total[offset : offset + n].reshape(shape)
            offset += n
        out: Arrays = {}
        for key, ref in reference.items():
            group = self.group_of(key)
            if key in sums and held[group]:
                out[key] = (ref + sums[key] / weight[group]).astype(ref.dtype)
            elif not np.issubdtype(ref.dtype, np.floating):
                out[key] = ref + np.asarray(steps, dtype=ref.dtype)
            else:
                out[key] = ref
        return out


def secure_layout(reference: Mapping[str, np.ndarray], spec: RoundSpec, scale: float) -> SecureLayout:
    """The round's layout, computed alike by the server and every site from what they all hold."""
    f = spec.config.federation
    local = batchnorm_entries(reference) if strategy_of(f.strategy).local_batchnorm else set()
    heads = [head_prefix(t) for t in spec.tasks]
    return SecureLayout.of(reference, heads, local, scale, f.secagg_clipping_range)


def batchnorm_entries(keys: Iterable[str]) -> set[str]:
    """Every entry of every BatchNorm layer (those with running statistics), named from the keys alone."""
    keys = set(keys)
    layers = {k.removesuffix("running_mean") for k in keys if k.endswith(".running_mean")}
    return {k for k in keys if any(k.startswith(p) and "." not in k[len(p) :] for p in layers)}
