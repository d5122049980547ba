"""Analyses of trained models for the second seed's study (Srinivasan et al., PLOS ONE 2022, "To pretrain or
not?"): activation spectra (`spectra`), robustness to ImageNet-C corruptions (`corruptions`) and LRP
heatmaps scored against lesion masks (`relevance`). Pure maths on models and arrays, writing nothing; the
`fedretina analyze` commands (files in, tables and figures out) are `simulation.analysis`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode (BatchNorm on running statistics, no dropout); its mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
