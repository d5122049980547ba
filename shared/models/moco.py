"""MoCo v2's model (He et al. 2020; Chen et al. 2020), contrastive pretraining for the second seed's setups
(its training method: `shared/training/moco.py`).

A query encoder (our encoder + a 2-layer projection MLP on the pooled H/32 map) is trained with InfoNCE to
match the key of another view of the same image among a queue of negatives; the key encoder is a momentum
(EMA) copy.

BatchNorm leaks (He et al. 2020, sec. 3.3): a query and its positive key normalised over the same images
share batch statistics that no queued negative shares, a cue the encoder can match instead of the images.
MoCo shuffles the key batch across
GPUs; on one device we split the batch into BN groups for the queries and *transposed* groups for the keys
(`bn_groups`), so a positive pair shares few other images' statistics (none beyond itself when the batch
is the square of the group count, e.g. 64 = 8 groups of 8).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    """Encoder + MLP head; `encoder` keeps the encoder's own keys so it exports like SparK's."""

    def __init__(self, encoder: nn.Module, dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        c = encoder.feature_channels[-1]
        self.head = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.encoder.forward_features(x)[-1].mean(dim=(2, 3))
        return F.normalize(self.head(pooled), dim=1)


class MoCo(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        dim: int = 128,
        queue: int = 4096,
        momentum: float = 0.999,
        temperature: float = 0.2,
    ) -> None:
        super().__init__()
        self.query = Projector(encoder, dim)
        self.key = copy.deepcopy(self.query)
        for p in self.key.parameters():
            p.requires_grad_(False)
        self.momentum, self.temperature = momentum, temperature
        self.register_buffer("queue", F.normalize(torch.randn(queue, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def encoder(self) -> nn.Module:
        return self.query.encoder

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """InfoNCE loss of a batch of query views against their key views and the queue."""
        query_groups, key_groups = bn_groups(len(x_q), g)
        q = _grouped(self.query, x_q, query_groups)
        with torch.no_grad():
            self._momentum_update()
            k = _grouped(self.key, x_k, key_groups)
        positive = (q * k).sum(dim=1, keepdim=True)
        negative = q @ self.queue.clone().T
        logits = torch.cat([positive, negative], dim=1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
        self._enqueue(k)
        return loss

    def _momentum_update(self) -> None:
        for pk, pq in zip(self.key.parameters(), self.query.parameters(), strict=True):
            pk.mul_(self.momentum).add_(pq.detach(), alpha=1 - self.momentum)
        for bk, bq in zip(self.key.buffers(), self.query.buffers(), strict=True):
            bk.copy_(bq)

    def _enqueue(self, k: torch.Tensor) -> None:
        n, size = len(k), len(self.queue)
        idx = (int(self.queue_ptr) + torch.arange(n, device=k.device)) % size
        self.queue[idx] = k.detach().to(self.queue.dtype)
        self.queue_ptr.fill_((int(self.queue_ptr) + n) % size)


MIN_BN_GROUP = 8


def bn_groups(n: int, g: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """BN groups for a batch of `n`: query groups are runs of a random permutation, key groups take every
    G-th image of it, so a key group meets each query group in about n / G^2 images (one when n = G^2).
    Groups keep at least `MIN_BN_GROUP` images: BN over 4 images is so noisy that two views of one image
    stop matching (measured: identical views, 60 steps, InfoNCE 3.6 with groups of 4, 2.9 of 8, chance
    3.9)."""
    groups = max(1, min(math.isqrt(n), n // MIN_BN_GROUP))
    perm = torch.randperm(n, generator=g)
    return list(perm.chunk(groups)), [perm[j::groups] for j in range(groups)]


def _grouped(net: nn.Module, x: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """`net` over `x` one BN group at a time, rows back in `x`'s order."""
    order = torch.cat(groups).to(x.device)
    out = torch.cat([net(x[idx.to(x.device)]) for idx in groups])
    return out[order.argsort()]
