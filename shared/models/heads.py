"""Task heads and the multi-task classifier used for fine-tuning (centralised and federated).

`TaskModel` = one encoder + one head per task (`heads.<task>.*`). The encoder's keys are exactly those the
pretraining exports, so `model.encoder.load_state_dict(export, strict=True)` has no missing or unexpected
keys. A head is nn-MobileNet's `out`: Dropout + 1x1 conv on the pooled H/32 map, so a single-task model
converts to nn-MobileNet's own classifier by renaming `heads.<task>.` to `out.`.
"""

from __future__ import annotations

import torch
from torch import nn

ENCODER = "encoder."  # the state-dict prefix of a TaskModel's (and a SparK or MoCo model's) encoder


def head_prefix(task: str) -> str:
    """The state-dict prefix of `task`'s head in a TaskModel."""
    return f"heads.{task}."


class ClassifierHead(nn.Sequential):
    def __init__(self, channels: int, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__(nn.Dropout(dropout), nn.Conv2d(channels, num_classes, 1))


class TaskModel(nn.Module):
    def __init__(self, encoder: nn.Module, tasks: dict[str, int], dropout: float = 0.2) -> None:
        super().__init__()
        self.encoder = encoder
        channels = encoder.feature_channels[-1]
        self.heads = nn.ModuleDict(
            {t: ClassifierHead(channels, k, dropout) for t, k in sorted(tasks.items())}
        )

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """Logits (B, classes) of `task`."""
        pooled = self.encoder.forward_features(x)[-1].mean(dim=(2, 3), keepdim=True)
        return self.heads[task](pooled).flatten(1)
