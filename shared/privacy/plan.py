"""What a private run will spend, before it runs: the (sample rate, steps) of each stretch of training.

Planned from the same `Span.pieces` that `run_phase` trains, so the plan is the steps really taken.
"""

from __future__ import annotations

from collections.abc import Mapping

from shared.privacy.sgd import sample_rate
from shared.training.phase import Span, steps_per_epoch


def span_plan(images: Mapping[str, int], batch_size: int, span: Span) -> list[tuple[float, int]]:
    """[(q, steps)] per task for `span` over datasets of `images[task]` images."""
    per_epoch = {t: steps_per_epoch(n, batch_size) for t, n in images.items()}
    steps: dict[str, int] = {}
    for piece in span.pieces(per_epoch):
        steps[piece.task] = steps.get(piece.task, 0) + piece.count
    return [(sample_rate(images[t], batch_size), n) for t, n in steps.items() if n]
