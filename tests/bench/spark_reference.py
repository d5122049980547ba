"""SparK's own training step, re-implemented after its code (keyu-tian/SparK, pretrain/encoder.py and
pretrain/spark.py), on our modules and weights: the anchor our step is timed against.

What SparK's code does, and this does too:
- every convolution and pooling is followed by an in-place multiplication with the mask, rebuilt at the
  layer's resolution on every call (`_get_active_ex_or_ii`);
- BatchNorm gathers the visible positions into an (N, C) matrix, normalises it with BatchNorm1d and
  scatters it back into zeros (`SparseBatchNorm2d`);
- densify: sparse BatchNorm, `torch.where` filling hidden positions with the mask token, the projection;
- the loss: per-patch normalised targets, MSE averaged over masked patches.

It runs through our encoders' own forward code and layer dispatch, with the rules that differ swapped for
SparK's while it runs, so both steps compute the same function of the same weights (the bench reports the
two losses at the first step) and differ only in how the sparsity is paid for.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

import shared.spark.sparse
from shared.spark.spark import SparK, patchify
from shared.spark.sparse import SparseMask


def active_ex(mask: SparseMask, x: torch.Tensor) -> torch.Tensor:
    """SparK's `_get_active_ex_or_ii(returning_active_ex=True)`: the mask at x's size, rebuilt each call."""
    f = mask.active_b1ff
    return f.repeat_interleave(x.shape[2] // f.shape[2], 2).repeat_interleave(x.shape[3] // f.shape[3], 3)


def sparse_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, mask: SparseMask) -> torch.Tensor:
    """SparK's SparseBatchNorm2d: gather the visible positions, BatchNorm1d, scatter back into zeros."""
    ii = active_ex(mask, x).squeeze(1).nonzero(as_tuple=True)
    bhwc = x.permute(0, 2, 3, 1)
    nc = F.batch_norm(
        bhwc[ii], bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, bn.momentum, bn.eps
    )
    out = torch.zeros_like(bhwc)
    out[ii] = nc
    return out.permute(0, 3, 1, 2)


def sparse_chain(modules: list[nn.Module], x: torch.Tensor, mask: SparseMask | None) -> torch.Tensor:
    """Layer after layer, each with its own mask multiplication (no convolution + norm fusion)."""
    for module in modules:
        x = shared.spark.sparse.sparse(module, x, mask)
    return x


@contextlib.contextmanager
def sparks_rules() -> Iterator[None]:
    """Our encoders' forward code and layer dispatch (`shared.spark.sparse.sparse`), with SparK's rules
    where they differ: a mask rebuilt on every call, BatchNorm by gather and scatter, no fusion."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(SparseMask, "like", active_ex))
        stack.enter_context(mock.patch.object(shared.spark.sparse, "masked_batch_norm", sparse_batch_norm))
        for name in ("shared.spark.sparse", "shared.models.nnmobilenet"):
            where = importlib.import_module(name)
            stack.enter_context(mock.patch.object(where, "sparse_chain", sparse_chain))
        yield


def reference_loss(model: SparK, images: torch.Tensor, active_b1ff: torch.Tensor) -> torch.Tensor:
    """SparK's forward (mask, sparse encoding, densify, decode, loss on masked patches) on our modules."""
    mask = SparseMask(active_b1ff)
    with sparks_rules():
        feats = model.encoder.forward_features(images * active_ex(mask, images), mask)[::-1]
    cur = active_b1ff
    to_dec = []
    for feat, norm, token, proj in zip(
        feats, model.densify_norms, model.mask_tokens, model.densify_projs, strict=True
    ):
        bcff = sparse_batch_norm(norm, feat, mask)
        tokens = token.weight.view(1, -1, 1, 1).expand_as(bcff)
        to_dec.append(proj(torch.where(cur.expand_as(bcff), bcff, tokens)))
        cur = cur.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    rec = model.decoder(to_dec)
    p = model.downsample_ratio
    inp, pred = patchify(images, p), patchify(rec, p)
    mean = inp.mean(dim=-1, keepdim=True)
    std = (inp.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    l2 = ((pred - (inp - mean) / std) ** 2).mean(dim=2)
    hidden = active_b1ff.logical_not().int().view(active_b1ff.shape[0], -1)
    return l2.mul_(hidden).sum() / (hidden.sum() + 1e-8)
