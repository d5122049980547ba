"""FLOPs per image of a training step: counted as executed, on a copy (the model is left as it was)."""

from __future__ import annotations

import torch

from shared.config import load_config
from shared.training.cost import flops_per_image
from shared.training.initialisation import pretraining_start
from shared.training.pretrain import spark_method


class Images(torch.utils.data.Dataset):
    def __init__(self, size: int) -> None:
        self.images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "fov": torch.ones(1, *self.images.shape[-2:], dtype=torch.bool)}


def _mae_flops(mask_ratio: float) -> float:
    cfg = load_config(
        profile="tiny",
        overrides={"model.arch": "vit_tiny", "pretrain.method": "mae", "pretrain.mask_ratio": mask_ratio},
    )
    model = pretraining_start(cfg)
    return flops_per_image(lambda m: spark_method(m, cfg, torch.device("cpu")), model, Images(64))


def test_mae_costs_less_the_more_it_hides_and_the_counted_model_is_left_untouched() -> None:
    """MAE's encoder runs on the visible patches only: hiding 75% costs well under half of hiding 25%."""
    assert 0 < _mae_flops(0.75) < 0.5 * _mae_flops(0.25)
    cfg = load_config(profile="tiny")
    model = pretraining_start(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flops = flops_per_image(lambda m: spark_method(m, cfg, torch.device("cpu")), model, Images(64))
    assert flops > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm stats too
