"""Activation spectra: prescribed covariances are recovered, round-off reads as null, the hooks find the stem
and pen activations and every block, the condition number and the Pareto fit equal hand and scipy
computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from shared.analysis.eigenspectra import (
    ChannelMoments,
    activation_moments,
    activation_spectra,
    conv_blocks,
    eigen_density,
    pareto_fit,
    percentile_condition_number,
)
from shared.models import TaskModel, nnmobilenet, resnet50
from shared.models.nnmobilenet import channel_plan


def test_streamed_moments_recover_a_prescribed_spectrum() -> None:
    """Activations Q diag(sqrt(lambda)) z + m, streamed in uneven batches, give back lambda (and np.cov's)."""
    prescribed = np.array([16.0, 8.0, 4.0, 2.0, 1.0, 0.5])
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    samples = rng.normal(size=(40_000, 6)) @ np.diag(np.sqrt(prescribed)) @ q.T + rng.normal(size=6) * 5
    moments = ChannelMoments()
    for chunk in np.split(samples, [992, 1_248, 30_016]):  # batches of different sizes
        acts_bchw = torch.from_numpy(chunk.T.reshape(6, -1, 8, 4).transpose(1, 0, 2, 3).copy()).float()
        moments.update(acts_bchw)
    recovered = moments.eigenvalues()
    assert np.all(np.diff(recovered) <= 0)
    assert np.abs(recovered / prescribed - 1).max() < 0.03  # sampling error ~ sqrt(2 / 40000) = 0.7%
    exact = np.linalg.eigvalsh(np.cov(samples.astype(np.float32).astype(np.float64).T))[::-1]
    np.testing.assert_allclose(recovered, exact, rtol=1e-9)


def test_null_directions_read_as_exact_zeros() -> None:
    """Samples in a 3-dimensional subspace of 6 channels: eigvalsh leaves round-off (of either sign) in the
    null space; we give 0, so the layer reads as rank-deficient (as deep layers of few, small images are)."""
    rng = np.random.default_rng(2)
    samples = rng.normal(size=(512, 3)) @ rng.normal(size=(3, 6)) + 5.0
    moments = ChannelMoments()
    moments.update(torch.from_numpy(samples.T.reshape(6, 8, 8, 8).transpose(1, 0, 2, 3).copy()))
    raw = np.linalg.eigvalsh(moments.covariance())
    assert np.abs(raw[:3]).max() > 0  # round-off, ~1e-16 of the largest
    eigenvalues = moments.eigenvalues()
    assert (eigenvalues[:3] > 0).all() and (eigenvalues[3:] == 0).all()
    assert percentile_condition_number(eigenvalues) == float("inf")


def test_spectra_of_a_real_layer_equal_numpys_over_the_same_activations() -> None:
    """The stem's activation (its SiLU, features.2) is full rank, unlike its conv (27 inputs, 32 channels)."""
    encoder = nnmobilenet(0.25)
    images = torch.randn(6, 3, 64, 64)
    captured: list[torch.Tensor] = []
    handle = encoder.features[2].register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    spectra = activation_spectra(encoder, [images[:2], images[2:]])  # two batches: streamed moments
    handle.remove()
    stem = torch.cat(captured).transpose(0, 1).flatten(1).double().numpy()  # (C, N*H*W)
    np.testing.assert_allclose(spectra["features.2"], np.linalg.eigvalsh(np.cov(stem))[::-1], atol=1e-9)
    assert len(stem) == 32 and (spectra["features.2"] > 0).all()


def test_hooks_find_the_stem_blocks_and_pen_of_nnmobilenet() -> None:
    model = TaskModel(nnmobilenet(0.25), {"dr": 5}).train()
    _, outs, stem, pen = channel_plan(0.25)
    spectra = activation_spectra(model, torch.randn(4, 3, 64, 64), batch_size=2)
    assert len(spectra) == 18  # stem SiLU + 16 LinearBottlenecks + pen SiLU
    assert list(spectra) == list(conv_blocks(model)) == [f"features.{i}" for i in (2, *range(3, 19), 21)]
    assert [len(v) for v in spectra.values()] == [stem, *outs, pen]
    for eigenvalues in spectra.values():
        assert eigenvalues.dtype == np.float64 and np.all(np.diff(eigenvalues) <= 0) and eigenvalues[-1] >= 0
    assert model.training  # the mode is restored
    assert all(not m._forward_hooks for m in model.modules())  # and the hooks removed


def test_hooks_find_the_stem_and_every_block_of_resnet50() -> None:
    """Moments only: the eigendecompositions of 2048 x 2048 covariances would take most of a minute here."""
    moments = activation_moments(resnet50(), torch.randn(2, 3, 32, 32))
    assert len(moments) == 17  # the stem's relu + 16 Bottlenecks
    assert list(moments)[:3] == ["relu", "layer1.0", "layer1.1"] and list(moments)[-1] == "layer4.2"
    stages = [(64, 16), (256, 8), (512, 4), (1024, 2), (2048, 1)]  # (channels, map side) at 32 px
    expected = [stages[0]] + [stages[1]] * 3 + [stages[2]] * 4 + [stages[3]] * 6 + [stages[4]] * 3
    assert [(len(m.mean), m.count) for m in moments.values()] == [(c, 2 * side**2) for c, side in expected]


def test_unsupported_models_and_loader_pairs_are_refused() -> None:
    with pytest.raises(ValueError, match="model: Conv2d is not supported"):
        activation_spectra(torch.nn.Conv2d(3, 4, 1), torch.randn(1, 3, 8, 8))
    pairs = [(torch.randn(2, 3, 64, 64), torch.zeros(2))]
    with pytest.raises(ValueError, match=r"x for x, _ in loader"):
        activation_spectra(nnmobilenet(0.25), pairs)
    with pytest.raises(ValueError, match="pass at least one image"):
        activation_spectra(nnmobilenet(0.25), [])


def test_percentile_condition_number_equals_the_hand_computed_ratio() -> None:
    assert percentile_condition_number(np.arange(1.0, 12.0)) == pytest.approx(10.0 / 2.0)
    # n = 5: the 10th percentile sits at position 0.4 (1 + 0.4 * 1), the 90th at 3.6 (8 + 0.6 * 8)
    assert percentile_condition_number([16.0, 1.0, 8.0, 2.0, 4.0]) == pytest.approx(12.8 / 1.4)
    assert percentile_condition_number([16.0, 1.0, 8.0, 2.0, 4.0], low=0, high=100) == pytest.approx(16.0)
    assert percentile_condition_number([0.0, 0.0, 0.0, 1.0, 2.0]) == float("inf")
    with pytest.raises(ValueError, match="low=90, high=10"):
        percentile_condition_number([1.0, 2.0], low=90, high=10)
    with pytest.raises(ValueError, match="negative"):
        percentile_condition_number([-1.0, 2.0])


def test_pareto_fit_recovers_the_exponent_and_equals_scipys_fixed_loc_fit() -> None:
    rng = np.random.default_rng(0)
    x = (rng.pareto(2.5, 5000) + 1.0) * 3.0  # classical Pareto, b = 2.5, x_min = 3
    fit = pareto_fit(x)
    assert fit.b == pytest.approx(2.5, rel=0.04)  # standard error b / sqrt(n) = 1.4%
    b, loc, scale = stats.pareto.fit(x, floc=0)
    assert (fit.b, fit.scale, loc) == (pytest.approx(b, rel=1e-9), pytest.approx(scale, rel=1e-12), 0)
    assert fit.ks_pvalue > 0.05
    assert pareto_fit(rng.exponential(size=5000) + 1.0).ks_pvalue < 1e-6  # not a power law: rejected
    with pytest.raises(ValueError, match="drop null eigenvalues"):
        pareto_fit([0.0, 1.0, 2.0])


def test_eigen_density_is_a_log_binned_probability_density() -> None:
    rng = np.random.default_rng(1)
    eigenvalues = np.concatenate([(rng.pareto(2.5, 2000) + 1.0), np.zeros(7)])  # nulls are left out
    edges, density = eigen_density(eigenvalues, bins=20)
    assert len(edges) == 21 and len(density) == 20
    np.testing.assert_allclose(edges[1:] / edges[:-1], edges[1] / edges[0])  # log-spaced
    assert (edges[0], edges[-1]) == (eigenvalues[eigenvalues > 0].min(), eigenvalues.max())
    assert float((density * np.diff(edges)).sum()) == pytest.approx(1.0)
    true_mean_density = np.diff(stats.pareto(2.5).cdf(edges[:3])) / np.diff(edges[:3])
    np.testing.assert_allclose(density[:2], true_mean_density, rtol=0.1)  # ~700 and ~500 samples per bin
