"""Optional cross-check of the masked-dense emulation against a real submanifold convolution (spconv).

GPU only: spconv's CPU build gives wrong results with more than one thread and needs a monkey-patch for its
backward pass (../shared/reference/spark-and-nnmobilenet.md), so off a GPU this is skipped with that reason.
Install the extra with `uv sync --extra gpu` on a CUDA machine.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared.spark.mask import random_mask
from shared.spark.sparse import SparseMask, sparse


def test_one_submanifold_convolution_equals_the_masked_dense_layer_at_active_sites() -> None:
    if not torch.cuda.is_available():
        pytest.skip(
            "spconv cross-check needs a CUDA GPU (spconv's CPU path is unreliable); nothing else needs one"
        )
    spconv = pytest.importorskip("spconv.pytorch", reason="spconv is not installed: uv sync --extra gpu")
    device = torch.device("cuda")
    torch.manual_seed(0)
    b, c_in, c_out, size = 4, 8, 16, 56
    active = random_mask(b, 7, 0.6, torch.Generator().manual_seed(1)).to(device)
    mask = SparseMask(active)
    x = torch.randn(b, c_in, size, size, device=device)
    x = x * mask.like(x)
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=True).to(device)
    dense = sparse(conv, x, mask)

    subm = spconv.SubMConv2d(c_in, c_out, 3, padding=1, bias=True, indice_key="check").to(device)
    with torch.no_grad():
        subm.weight.copy_(conv.weight.permute(0, 2, 3, 1))  # spconv 2.x keeps weights as [out, kH, kW, in]
        subm.bias.copy_(conv.bias)
    sites = mask.at(size, size, torch.bool)[:, 0].nonzero()  # (N, 3): batch, row, column
    features = x.permute(0, 2, 3, 1)[sites[:, 0], sites[:, 1], sites[:, 2]]
    tensor = spconv.SparseConvTensor(features, sites.int(), [size, size], b)
    out = subm(tensor).dense()

    at = mask.at(size, size, torch.bool).expand_as(dense)
    assert torch.allclose(out[at], dense[at], atol=1e-4), (out[at] - dense[at]).abs().max()
    assert (dense[~at] == 0).all()
