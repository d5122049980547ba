"""LRP heatmaps: relevance is conserved on both encoders (and only thanks to the canonizers), the model is
unchanged after a call, and the mask scores are right on hand-made heatmaps and at chance on random ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from shared.analysis import lrp as relevance
from shared.analysis.lrp import (
    input_relevance,
    random_control,
    relevance_map,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
)
from shared.models import TaskModel, nnmobilenet, resnet50

SEVERE_DR = 4
ENCODERS = {"nnmobilenet": lambda: nnmobilenet(0.25), "resnet50": resnet50}


def lrp_ready(encoder: nn.Module) -> TaskModel:
    """A DR classifier with fan-in init, random BN scales and running variances, and every bias (merged
    BN biases included) zero, so that no relevance is absorbed: conservation must then hold."""
    torch.manual_seed(0)
    model = TaskModel(encoder, {"dr": 5})
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.zeros_(m.bias)
            m.running_mean.zero_()
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("arch", ENCODERS)
def test_input_relevance_sums_to_the_target_logit(arch: str) -> None:
    model = lrp_ready(ENCODERS[arch]())
    images = torch.randn(2, 3, 64, 64)
    scores, logits = input_relevance(model, images, "dr", SEVERE_DR)
    with torch.no_grad():
        expected = model(images, "dr")[:, SEVERE_DR]
    torch.testing.assert_close(logits, expected, rtol=1e-3, atol=1e-3)  # merged BN: same function
    assert scores.shape == images.shape
    np.testing.assert_allclose(scores.sum(dim=(1, 2, 3)), logits, rtol=0.01)


@pytest.mark.parametrize("arch", ENCODERS)
def test_without_the_canonizers_relevance_is_not_conserved(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The conservation test can fail: plain `+` skips and the SE's gate break it."""
    model = lrp_ready(ENCODERS[arch]())
    monkeypatch.setattr(relevance, "canonizers", lambda _encoder: [])
    scores, logits = input_relevance(model, torch.randn(1, 3, 64, 64), "dr", SEVERE_DR)
    ratio = float(scores.sum() / logits)
    assert abs(ratio - 1) > 0.1, ratio  # measured: 6e7 (nn-MobileNet), 65536 = 2^16 (ResNet50)


def test_the_model_is_unchanged_after_a_call() -> None:
    model = lrp_ready(nnmobilenet(0.25)).train()
    images = torch.randn(2, 3, 64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        outputs = model.eval()(images, "dr")
    model.train()
    relevance_map(model, images, "dr", SEVERE_DR)
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model.eval()(images, "dr"), outputs)
    for module in model.modules():
        assert not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
        assert "forward" not in vars(module) and not hasattr(module, "canonizer_sum")
    assert all(p.grad is None for p in model.parameters())


def test_heatmaps_pool_the_channels_by_sum_and_by_max_abs() -> None:
    model = lrp_ready(nnmobilenet(0.25))
    images = torch.randn(2, 3, 64, 64)
    maps = relevance_map(model, images, "dr", SEVERE_DR)
    scores, _ = input_relevance(model, images, "dr", SEVERE_DR)
    assert set(maps) == {"sum", "max_abs"} and all(m.shape == (2, 64, 64) for m in maps.values())
    np.testing.assert_allclose(maps["sum"], scores.sum(dim=1).numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(maps["max_abs"], scores.abs().amax(dim=1).numpy(), rtol=1e-5, atol=1e-9)


def test_bad_requests_are_refused_with_the_argument_named() -> None:
    model = lrp_ready(nnmobilenet(0.25))
    images = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="task: 'glaucoma' is not one of the model's tasks"):
        input_relevance(model, images, "glaucoma", 0)
    with pytest.raises(ValueError, match=r"target_class: 5 is not a class of 'dr' \(0..4\)"):
        input_relevance(model, images, "dr", 5)
    with pytest.raises(ValueError, match="channel_pool: unknown pooling 'mean'"):
        relevance_map(model, images, "dr", SEVERE_DR, channel_pool=("mean",))
    with pytest.raises(ValueError, match="LRP needs a BatchNorm model"):
        input_relevance(TaskModel(nnmobilenet(0.25, norm="gn"), {"dr": 5}), images, "dr", 0)


def test_scores_of_hand_made_heatmaps() -> None:
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:3] = True
    inside_only = np.where(mask, 1.0, 0.0)
    assert relevance_mass_accuracy(inside_only, mask) == 1.0
    assert relevance_rank_accuracy(inside_only, mask) == 1.0
    assert relevance_mass_accuracy(1.0 - inside_only, mask) == 0.0
    assert relevance_rank_accuracy(1.0 - inside_only, mask) == 0.0
    mixed = np.zeros((4, 4))
    mixed[1, 1], mixed[2, 2] = 3.0, 2.0  # inside
    mixed[0, 0], mixed[0, 3], mixed[3, 3] = 1.0, 0.5, -5.0  # outside; negative relevance is no evidence
    assert relevance_mass_accuracy(mixed, mask) == pytest.approx(5.0 / 6.5)
    assert relevance_rank_accuracy(mixed, mask) == 0.5  # the top 4: 3 and 2 inside, 1 and 0.5 outside
    assert np.isnan(relevance_mass_accuracy(mixed, np.zeros((4, 4))))
    assert np.isnan(relevance_mass_accuracy(-inside_only, mask))
    with pytest.raises(ValueError, match="heatmap, mask: need two 2-D arrays of one shape"):
        relevance_mass_accuracy(mixed, mask[:3])


def test_the_random_control_scores_the_masks_area_fraction() -> None:
    rng = np.random.default_rng(0)
    mask = np.zeros((48, 48), dtype=bool)
    mask[10:22, 5:29] = True  # 288 px: area fraction 0.125
    draws = 300
    for score in (relevance_mass_accuracy, relevance_rank_accuracy):
        values = np.array([score(random_control((48, 48), rng), mask) for _ in range(draws)])
        standard_error = values.std(ddof=1) / np.sqrt(draws)
        assert abs(values.mean() - mask.mean()) < 4 * standard_error, (score.__name__, values.mean())
        assert standard_error < 0.002  # the test can tell 0.125 from a biased score
