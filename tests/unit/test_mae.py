"""MAE and the ViT encoder: the loss equals its definition on a hand-made patch grid (hidden patches only,
per-patch normalised targets), the encoder sees only the visible patches, and a ViT-MAE checkpoint in
RETFound's format loads, or is refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shared.config import load_config
from shared.errors import CheckpointError, ConfigError
from shared.models import TaskModel
from shared.models.vit import ViTEncoder
from shared.training.finetune import STAGE_DEPTH, layer_id
from shared.training.initialisation import initialise, pretraining_start
from shared.training.mae import MAE, mae_loss, patchify, random_keep


def test_patchify_flattens_each_patch_row_by_row_with_its_channels_innermost() -> None:
    images = torch.arange(2 * 3 * 32 * 48, dtype=torch.float32).reshape(2, 3, 32, 48)
    patches = patchify(images)
    assert patches.shape == (2, 2 * 3, 16 * 16 * 3)
    # patch 4 = grid row 1, column 1; its element (row 5, column 7, channel 2)
    assert patches[1, 4, (5 * 16 + 7) * 3 + 2] == images[1, 2, 16 + 5, 16 + 7]


def test_the_loss_is_the_mean_over_hidden_patches_of_the_error_against_per_patch_normalised_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 32, 32, generator=g)
    pred = torch.randn(1, 4, 768, generator=g)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    by_hand = []
    for k in (0, 2):  # the hidden patches
        row, col = divmod(k, 2)
        patch = images[0, :, 16 * row : 16 * row + 16, 16 * col : 16 * col + 16].permute(1, 2, 0).numpy()
        target = patch.reshape(-1).astype(np.float64)
        target = (target - target.mean()) / np.sqrt(target.var(ddof=1) + 1e-6)
        by_hand.append(np.mean((pred[0, k].double().numpy() - target) ** 2))
    assert mae_loss(pred, images, mask).item() == pytest.approx(np.mean(by_hand), rel=1e-5)
    # visible patches do not count; a patch's brightness and contrast do not either
    changed = pred.clone()
    changed[0, 1] += 5.0
    brighter = images.clone()
    brighter[..., :16, :16] = 0.5 * brighter[..., :16, :16] + 0.2
    assert mae_loss(changed, brighter, mask).item() == pytest.approx(
        mae_loss(pred, images, mask).item(), rel=1e-4
    )


def test_random_keep_hides_the_ratio_of_patches_per_image_reproducibly() -> None:
    kept, mask = random_keep(3, 64, 0.75, torch.Generator().manual_seed(1))
    assert kept.shape == (3, 16) and (mask.sum(dim=1) == 48).all()
    assert all(len(set(row.tolist())) == 16 for row in kept)
    assert all((mask[i, kept[i]] == 0).all() for i in range(3))
    again, _ = random_keep(3, 64, 0.75, torch.Generator().manual_seed(1))
    assert torch.equal(kept, again) and not torch.equal(kept[0], kept[1])


def test_the_encoder_sees_only_the_visible_patches() -> None:
    torch.manual_seed(0)
    encoder = ViTEncoder("vit_tiny").eval()
    images = torch.randn(1, 3, 64, 64)
    kept = torch.tensor([[0, 5, 10, 15]])
    other = images.clone()
    other[..., 16:32, :16] = torch.randn(16, 16)  # patch 4: hidden
    with torch.no_grad():
        assert torch.equal(encoder.tokens(images, kept), encoder.tokens(other, kept))
        other[..., :16, 16:32] += 1.0  # patch 1: hidden too; patch 0 is visible
        other[..., :16, :16] += 1.0
        assert not torch.equal(encoder.tokens(images, kept), encoder.tokens(other, kept))


def test_mae_trains_the_encoder_and_a_vit_fine_tunes_as_any_encoder() -> None:
    torch.manual_seed(0)
    mae = MAE(ViTEncoder("vit_tiny"), image_size=64, mask_ratio=0.75, decoder_width=64, decoder_depth=1)
    loss, pred, mask = mae(torch.randn(2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    assert pred.shape == (2, 16, 768) and mask.sum() == 2 * 12 and torch.isfinite(loss)
    loss.backward()
    assert mae.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model = TaskModel(mae.encoder, {"dr": 5})
    assert model(torch.randn(2, 3, 64, 64), "dr").shape == (2, 5)
    # layer-wise decay as BEiT / MAE: embeddings 0, block i at i + 1, the final norm with the heads
    assert STAGE_DEPTH["vit_tiny"] == 13
    ids = {n: layer_id(n, "vit_tiny") for n, _ in model.named_parameters()}
    assert ids["encoder.pos_embed"] == 0 and ids["encoder.blocks.0.attn.qkv.weight"] == 1
    assert ids["encoder.blocks.11.mlp.fc2.bias"] == 12 and ids["encoder.norm.weight"] == 13
    assert ids["heads.dr.1.weight"] == 13


def _retfound_like(path: Path, arch: str) -> None:
    """A checkpoint in RETFound's published format: {"model": the MAE's state}, decoder keys included."""
    state = ViTEncoder(arch).state_dict() | {
        "mask_token": torch.zeros(1, 1, 64),
        "decoder_embed.weight": torch.zeros(64, 192),
        "decoder_pred.bias": torch.zeros(768),
    }
    torch.save({"model": state, "epoch": 10}, path)


def test_a_vit_mae_checkpoint_loads_its_encoder_and_one_of_another_shape_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    ckpt = tmp_path / "RETFound_like.pth"
    _retfound_like(ckpt, "vit_tiny")
    tiny = load_config(profile="tiny", overrides={"model.arch": "vit_tiny"}).model
    encoder = ViTEncoder("vit_tiny")
    assert initialise(encoder, "mae", str(ckpt), tiny) == f"ViT-MAE checkpoint {ckpt}"
    saved = torch.load(ckpt, weights_only=True)["model"]
    assert torch.equal(encoder.blocks[3].mlp.fc1.weight, saved["blocks.3.mlp.fc1.weight"])

    small = load_config(profile="tiny", overrides={"model.arch": "vit_small"}).model
    with pytest.raises(CheckpointError) as refused:
        initialise(ViTEncoder("vit_small"), "mae", str(ckpt), small)
    assert "other shapes than the model's" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(CheckpointError, match="ViT-MAE checkpoint file not found; download it once"):
        initialise(encoder, "mae", str(tmp_path / "absent.pth"), tiny)


def test_spark_on_a_vit_and_mae_on_a_cnn_are_refused_in_one_line() -> None:
    with pytest.raises(
        ConfigError, match="spark needs a CNN encoder; a ViT \\(vit_tiny\\) pretrains with mae"
    ):
        pretraining_start(load_config(profile="tiny", overrides={"model.arch": "vit_tiny"}))
    with pytest.raises(ConfigError, match=r"mae pretrains a ViT; set model\.arch"):
        pretraining_start(load_config(profile="tiny", overrides={"pretrain.method": "mae"}))
