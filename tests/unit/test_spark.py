"""SparK's invariants, held on our masked-dense emulation (float64 where exactness is claimed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared.models import nnmobilenet, resnet50
from shared.spark.mask import random_mask, visible_count
from shared.spark.spark import SparK, masked_patch_loss, patchify, unpatchify
from shared.spark.sparse import MaskedGroupNorm, SparseMask, masked_batch_norm

SIZE = 64  # 2x2 mask grid: the tiny profile's shape, same code path as 224


def tiny_encoder(arch: str = "nnmobilenet", norm: str = "bn") -> nn.Module:
    enc = nnmobilenet(0.25, norm=norm) if arch == "nnmobilenet" else resnet50(norm=norm)
    return enc.double()


def batch(n: int = 4, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_mask_keeps_round_grid2_times_visible_fraction_per_sample() -> None:
    g = torch.Generator().manual_seed(0)
    m = random_mask(16, 7, 0.6, g)
    assert m.dtype == torch.bool and m.shape == (16, 1, 7, 7)
    assert visible_count(7, 0.6) == 20
    assert (m.sum(dim=(1, 2, 3)) == 20).all()
    assert not torch.equal(m[0], m[1]), "samples must draw independent masks"
    assert torch.equal(m, random_mask(16, 7, 0.6, torch.Generator().manual_seed(0)))


def test_mask_upsampling_is_repetition() -> None:
    active = random_mask(2, 2, 0.5, torch.Generator().manual_seed(1))
    up = SparseMask(active).at(8, 8, torch.bool)
    assert torch.equal(up[:, :, ::4, ::4], active)
    assert torch.equal(up, active.repeat_interleave(4, 2).repeat_interleave(4, 3))


@pytest.mark.parametrize(("arch", "norm"), [("nnmobilenet", "bn"), ("nnmobilenet", "gn"), ("resnet50", "bn")])
def test_masked_pixels_never_reach_any_feature_and_masked_features_are_zero(arch: str, norm: str) -> None:
    enc = tiny_encoder(arch, norm).train()
    x = batch()
    active = random_mask(4, 2, 0.5, torch.Generator().manual_seed(2))
    sp = SparK(enc, decoder_width=32, mask_ratio=0.5, norm=norm).double()
    pixels = SparseMask(active).at(SIZE, SIZE, torch.float64)
    noisy = x + 5.0 * torch.randn_like(x) * (1 - pixels)  # change only masked pixels
    torch.manual_seed(0)
    clean_feats = sp.encode(x, active)
    torch.manual_seed(0)
    noisy_feats = sp.encode(noisy, active)
    assert len(clean_feats) == 5
    for a, b in zip(clean_feats, noisy_feats, strict=True):
        assert torch.equal(a, b), "a masked pixel leaked into an encoder feature"
        hidden = ~SparseMask(active).at(a.shape[-2], a.shape[-1], torch.bool).expand_as(a)
        assert (a[hidden] == 0).all()


@pytest.mark.parametrize("arch", ["nnmobilenet", "resnet50"])
def test_all_visible_sparse_encoder_equals_dense_network(arch: str) -> None:
    enc = tiny_encoder(arch).eval()
    x = batch()
    dense = enc.forward_features(x)
    sparse_feats = enc.forward_features(x, SparseMask(torch.ones(4, 1, 2, 2, dtype=torch.bool)))
    for d, s in zip(dense, sparse_feats, strict=True):
        assert (d - s).abs().max().item() <= 1e-10
    # Train mode too: batch statistics over all positions are the dense statistics.
    enc.train()
    for d, s in zip(
        enc.forward_features(x),
        enc.forward_features(x, SparseMask(torch.ones(4, 1, 2, 2, dtype=torch.bool))),
        strict=True,
    ):
        assert (d - s).abs().max().item() <= 1e-10


def test_loss_gradient_is_zero_on_every_visible_patch() -> None:
    x = batch()
    rec = torch.randn_like(x, requires_grad=True)
    active = random_mask(4, 2, 0.5, torch.Generator().manual_seed(3))
    masked_patch_loss(x, rec, active).backward()
    grad = patchify(rec.grad, SIZE // 2).abs().amax(dim=-1)  # (B, L)
    visible = active.flatten(1)
    assert (grad[visible] == 0).all()
    assert (grad[~visible] > 0).all()


def test_loss_matches_an_explicit_per_patch_reference() -> None:
    x, rec = batch(3), batch(3, seed=1)
    active = random_mask(3, 2, 0.5, torch.Generator().manual_seed(4))
    p = SIZE // 2
    total, count = 0.0, 0
    for b in range(3):
        for i in range(2):
            for j in range(2):
                if active[b, 0, i, j]:
                    continue
                patch = x[b, :, i * p : (i + 1) * p, j * p : (j + 1) * p].permute(1, 2, 0).reshape(-1)
                target = (patch - patch.mean()) / torch.sqrt(patch.var(unbiased=True) + 1e-6)
                pred = rec[b, :, i * p : (i + 1) * p, j * p : (j + 1) * p].permute(1, 2, 0).reshape(-1)
                total += ((pred - target) ** 2).mean().item()
                count += 1
    # SparK divides by (number of masked patches + 1e-8); so does the reference here.
    assert masked_patch_loss(x, rec, active).item() == pytest.approx(total / (count + 1e-8), rel=1e-12)


def test_in_disc_loss_equals_sparks_when_the_disc_fills_every_patch() -> None:
    x, rec = batch(3), batch(3, seed=1)
    active = random_mask(3, 2, 0.5, torch.Generator().manual_seed(2))
    full = torch.ones(3, 1, SIZE, SIZE, dtype=torch.bool)
    for reduction in ("batch", "sample"):
        spark = masked_patch_loss(x, rec, active, reduction=reduction)
        assert masked_patch_loss(x, rec, active, fov=full, reduction=reduction).item() == pytest.approx(
            spark.item(), rel=1e-12
        )


def test_in_disc_loss_normalises_and_scores_each_patch_over_its_disc_pixels() -> None:
    x, rec = batch(1), batch(1, seed=1)
    active = torch.zeros(1, 1, 2, 2, dtype=torch.bool)  # everything masked
    p = SIZE // 2
    fov = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.bool)
    fov[..., :p, :p] = True  # top-left patch: all disc
    fov[..., :p, p : p + p // 2] = True  # top-right: its left half
    fov[..., p : p + 2, :4] = True  # bottom-left: 8 pixels, under MIN_DISC: left out
    expected = []
    for j, cols in ((0, p), (1, p // 2)):
        inside = x[0, :, :p, j * p : j * p + cols].permute(1, 2, 0).reshape(-1)
        target = (inside - inside.mean()) / torch.sqrt(inside.var(unbiased=True) + 1e-6)
        pred = rec[0, :, :p, j * p : j * p + cols].permute(1, 2, 0).reshape(-1)
        expected.append(((pred - target) ** 2).mean().item())
    loss = masked_patch_loss(x, rec, active, fov=fov)
    assert loss.item() == pytest.approx(sum(expected) / (2 + 1e-8), rel=1e-12)


def test_per_sample_reduction_averages_each_sample_over_its_own_patches() -> None:
    x, rec = batch(2), batch(2, seed=1)
    active = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool).view(2, 1, 2, 2)
    per_sample = masked_patch_loss(x, rec, active, reduction="sample")
    separate = [masked_patch_loss(x[i : i + 1], rec[i : i + 1], active[i : i + 1]) for i in range(2)]
    assert per_sample.item() == pytest.approx(sum(s.item() for s in separate) / 2, rel=1e-12)


def test_batchnorm_running_statistics_come_from_visible_positions_only() -> None:
    bn = nn.BatchNorm2d(3).double().train()
    x = batch(4, 16)
    active = random_mask(4, 2, 0.5, torch.Generator().manual_seed(5))
    m = SparseMask(active)
    xm = x * m.like(x)
    masked_batch_norm(bn, xm, m)
    visible = m.at(16, 16, torch.bool).expand_as(x)
    vals = xm.permute(1, 0, 2, 3)[visible.permute(1, 0, 2, 3)].view(3, -1)
    expected_mean = 0.1 * vals.mean(dim=1)
    expected_var = 0.9 * 1.0 + 0.1 * vals.var(dim=1, unbiased=True)
    assert torch.allclose(bn.running_mean, expected_mean, rtol=0, atol=1e-12)
    assert torch.allclose(bn.running_var, expected_var, rtol=0, atol=1e-12)
    assert int(bn.num_batches_tracked) == 1


def test_encoder_batchnorms_after_one_sparkstep_saw_only_visible_positions() -> None:
    """In a full SparK step, the stem's BN running mean equals 0.1 x the mean of its visible inputs."""
    enc = tiny_encoder().train()
    sp = SparK(enc, decoder_width=32, mask_ratio=0.5).double().train()
    x = batch()
    active = random_mask(4, 2, 0.5, torch.Generator().manual_seed(6))
    m = SparseMask(active)
    conv_out = enc.features[0](x * m.like(x)) * m.like(enc.features[0](x))
    visible = m.at(conv_out.shape[-2], conv_out.shape[-1], torch.bool).expand_as(conv_out)
    vals = conv_out.permute(1, 0, 2, 3)[visible.permute(1, 0, 2, 3)].view(conv_out.shape[1], -1)
    loss, _, _ = sp(x, active)
    loss.backward()
    assert torch.allclose(enc.features[1].running_mean, 0.1 * vals.mean(dim=1), atol=1e-12, rtol=0)


def test_masked_groupnorm_is_groupnorm_without_a_mask_and_per_sample_with_one() -> None:
    gn = MaskedGroupNorm(8, groups=4).double()
    with torch.no_grad():
        gn.affine.weight.uniform_(0.5, 1.5)
        gn.affine.bias.uniform_(-1, 1)
    x = (
        batch(3, 8)[:, :1].repeat(1, 8, 1, 1)
        + batch(3, 8, seed=2)[:, :1].repeat(1, 8, 1, 1) * torch.arange(8.0).view(1, 8, 1, 1).double()
    )
    ref = nn.GroupNorm(4, 8).double()
    with torch.no_grad():
        ref.weight.copy_(gn.affine.weight.view(-1))
        ref.bias.copy_(gn.affine.bias)
    assert torch.allclose(gn(x), ref(x), atol=1e-12)
    active = random_mask(3, 2, 0.5, torch.Generator().manual_seed(7))
    m = SparseMask(active)
    full = gn(x * m.like(x), m)
    for i in range(3):  # each sample normalised alone gives the same result: no batch coupling
        alone = gn(x[i : i + 1] * m.like(x)[i : i + 1], SparseMask(active[i : i + 1]))
        assert torch.allclose(full[i : i + 1], alone, atol=1e-12)


def test_patchify_round_trips() -> None:
    x = batch(2)
    assert torch.equal(unpatchify(patchify(x, 32), 32), x)
    v = patchify(x, 32)[0, 0]
    assert v[0].item() == x[0, 0, 0, 0].item() and v[1].item() == x[0, 1, 0, 0].item()  # (row, col, channel)


def test_reconstruction_keeps_visible_pixels() -> None:
    enc = tiny_encoder().train()
    sp = SparK(enc, decoder_width=32, mask_ratio=0.5).double()
    x = batch()
    loss, rec, active = sp(x, generator=torch.Generator().manual_seed(8))
    visible = SparseMask(active).at(SIZE, SIZE, torch.bool).expand_as(x)
    assert torch.equal(rec[visible], x[visible])
    assert 0.5 < loss.item() < 2.0  # about 1 at initialisation: unit-variance targets


def test_masked_batchnorm_and_its_gradients_equal_the_plain_formula_over_visible_positions() -> None:
    """Whatever a convolution left at hidden positions: the output there is 0 and gets no gradient."""
    g = torch.Generator().manual_seed(9)
    mask = SparseMask(random_mask(3, 2, 0.5, g))
    m = mask.at(8, 8, torch.float64)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64).requires_grad_()  # not 0 where hidden
    bn = nn.BatchNorm2d(4).double().train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.normal_(generator=g)
    upstream = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)

    def plain(x: torch.Tensor) -> torch.Tensor:
        n = m.sum()
        mean = (x * m).sum((0, 2, 3)) / n
        var = (((x - mean[None, :, None, None]) * m) ** 2).sum((0, 2, 3)) / n
        xhat = (x - mean[None, :, None, None]) / torch.sqrt(var + 1e-5)[None, :, None, None]
        return (xhat * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]) * m

    ours = masked_batch_norm(bn, x, mask)
    assert torch.allclose(ours, plain(x), atol=1e-12)
    params = (x, bn.weight, bn.bias)
    grads = torch.autograd.grad((ours * upstream).sum(), params)
    ref = torch.autograd.grad((plain(x) * upstream).sum(), params)
    for ours_g, ref_g in zip(grads, ref, strict=True):
        assert torch.allclose(ours_g, ref_g, atol=1e-10)
    assert torch.equal(grads[0] * (1 - m), torch.zeros_like(x))
    assert torch.autograd.gradcheck(lambda x: masked_batch_norm(bn, x, mask), (x,))
