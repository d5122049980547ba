"""Encoders: paper-size shapes and counts, the encoder contract, strict export/import, DP readiness."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared.models import TaskModel, nnmobilenet, resnet50
from shared.models.nnmobilenet import channel_plan
from shared.spark.mask import random_mask
from shared.spark.spark import SparK


def test_nnmobilenet_at_width_3_has_the_papers_size_and_scales() -> None:
    enc = nnmobilenet(3.0)
    params = sum(p.numel() for p in enc.parameters())
    assert abs(params - 30.9e6) <= 0.1e6
    assert enc.feature_channels == [48, 116, 183, 386, 3840]
    assert enc.downsample_ratio == 32
    assert sum(p.numel() for p in nnmobilenet(3.0, 1000).parameters()) == pytest.approx(34.709e6, abs=0.01e6)


def test_channel_widths_use_bankers_rounding() -> None:
    _, outs, stem, pen = channel_plan(3.0)
    assert outs[6] == 250 and outs[14] == 520  # 250.5 -> 250 and 520.5 -> 520, not 251 / 521
    assert outs[1:3] == [82, 116] and stem == 96 and pen == 3840


@pytest.mark.parametrize("build", [lambda: nnmobilenet(0.25), lambda: resnet50()])
def test_encoder_contract_without_a_forward_pass(build) -> None:
    enc = build().eval()
    channels = enc.feature_channels
    channels.pop()  # SparK pops the list: it must be a fresh copy
    assert len(enc.feature_channels) == 5
    feats = enc.forward_features(torch.randn(2, 3, 64, 64))
    assert [f.shape[1] for f in feats] == enc.feature_channels
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]  # H/2 .. H/32, each exactly twice the next


@pytest.mark.parametrize("arch", ["nnmobilenet", "resnet50"])
def test_pretrained_encoder_loads_strictly_into_the_classifier(arch: str) -> None:
    enc = nnmobilenet(0.25) if arch == "nnmobilenet" else resnet50()
    spark = SparK(enc, decoder_width=32)
    exported = spark.encoder.state_dict()
    fresh = nnmobilenet(0.25) if arch == "nnmobilenet" else resnet50()
    classifier = TaskModel(fresh, {"dr": 5})
    result = classifier.encoder.load_state_dict(exported, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in exported.items():
        assert torch.equal(classifier.encoder.state_dict()[key], value)


def test_export_matches_nnmobilenets_own_classifier_keys() -> None:
    exported = SparK(nnmobilenet(0.25), decoder_width=32).encoder.state_dict()
    result = nnmobilenet(0.25, 5).load_state_dict(exported, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == ["out.1.bias", "out.1.weight"]  # the head only


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_gn_encoder_gives_exact_per_sample_gradients_under_opacus() -> None:
    """Opacus's per-sample gradients of a masked SparK step equal one backward pass per sample."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = SparK(
        nnmobilenet(0.25, norm="gn"), decoder_width=32, mask_ratio=0.5, norm="gn", loss_reduction="sample"
    )
    model = model.double().train()  # Opacus records activations in train mode; no dropout, GN has no state
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    active = random_mask(3, 2, 0.5, torch.Generator().manual_seed(1))
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    loss, _, _ = gsm(x, active)
    loss.backward()
    per_sample = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    gsm._close()
    for i in range(3):
        model.zero_grad()
        single, _, _ = model(x[i : i + 1], active[i : i + 1])
        single.backward()
        for name, p in model.named_parameters():
            ref = p.grad if p.grad is not None else torch.zeros_like(p)
            # With loss_reduction="mean", Opacus's grad_sample[i] is the gradient of sample i's own loss.
            assert torch.allclose(per_sample[name][i], ref, atol=1e-10, rtol=1e-7), name


def test_no_inplace_activations_anywhere() -> None:
    for model in (nnmobilenet(0.25), resnet50()):
        for m in model.modules():
            assert not getattr(m, "inplace", False), f"{type(m).__name__} is in-place (Opacus cannot hook it)"
    assert isinstance(nnmobilenet(0.25, norm="gn").features[1].affine, nn.Conv2d)


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        # nn-MobileNet: stem, six block stages (the pen conv joins the last), heads: 8 ids
        (
            "nnmobilenet",
            {
                "encoder.features.0.": 7,
                "encoder.features.3.": 6,
                "encoder.features.4.": 5,
                "encoder.features.18.": 1,
                "encoder.features.19.": 1,
                "heads.": 0,
            },
        ),
        ("resnet50", {"encoder.conv1.": 5, "encoder.layer1.": 4, "encoder.layer4.": 1, "heads.": 0}),
    ],
)
def test_layer_decay_groups_parameters_by_stage(arch: str, expected: dict[str, int]) -> None:
    """Each parameter's lr multiplier is decay^(stages above it): the stem of nn-MobileNet gets 0.7^7."""
    from shared.config import load_config
    from shared.training.finetune import build_task_model, finetune_optimizer

    cfg = load_config(profile="tiny", overrides={"model.arch": arch, "finetune.layer_decay": 0.7})
    model = build_task_model(cfg, {"dr": 5})
    scale = {id(p): g["lr_scale"] for g in finetune_optimizer(model, cfg).param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    for prefix, above in expected.items():
        chosen = [p for n, p in names.items() if n.startswith(prefix)]
        assert chosen and all(scale[id(p)] == pytest.approx(0.7**above) for p in chosen), prefix
    assert len(set(scale.values())) == (8 if arch == "nnmobilenet" else 6)
    assert len(scale) == len(names)  # every parameter has its group
