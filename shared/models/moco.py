"""MoCo v2's model (He et al. 2020; Chen et al. 2020), contrastive pretraining for the second seed's setups
(its training method: `shared/training/moco.py`).

A query encoder (our encoder + a 2-layer projection MLP on the pooled H/32 map) is trained with InfoNCE to
match the key of another view of the same image among a queue of negatives; the key encoder is a momentum
(EMA) copy. Without several GPUs to shuffle BatchNorm across, the key batch is encoded in two shuffled halves,
which keeps BN statistics from leaking the positive pair (the role of MoCo's shuffling BN).
"""

from __future__ import annotations

import copy

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
        q = self.query(x_q)
        with torch.no_grad():
            self._momentum_update()
            k = self._keys(x_k, g)
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

    def _keys(self, x_k: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        perm = torch.randperm(len(x_k), generator=g).to(x_k.device)
        halves = [self.key(part) for part in x_k[perm].chunk(2)] if len(x_k) >= 4 else [self.key(x_k[perm])]
        return torch.cat(halves)[perm.argsort()]

    def _enqueue(self, k: torch.Tensor) -> None:
        n, size = len(k), len(self.queue)
        idx = (int(self.queue_ptr) + torch.arange(n, device=k.device)) % size
        self.queue[idx] = k.detach().to(self.queue.dtype)
        self.queue_ptr.fill_((int(self.queue_ptr) + n) % size)
