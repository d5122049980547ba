"""The centralised curve compare leaves beside a federated arm's store, put on that arm's rounds: epoch e of
E on round e x R / E, the nearest epoch wherever several fall near one round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.dashboard.data import CENTRALISED_CURVE, Store, _centralised_curve


def curve_on_rounds(tmp_path: Path, epochs: int, rounds: int) -> dict[int, float | None]:
    (tmp_path / CENTRALISED_CURVE).write_text(
        json.dumps([{"epochs": e, "auc": e / 100} for e in range(1, epochs + 1)])
    )
    store = Store(tmp_path / "store.sqlite", "arm")
    return _centralised_curve(store, {"federation": {"rounds_finetune": rounds}})["auc"]


@pytest.mark.parametrize(
    ("epochs", "rounds", "expected"),
    [
        (4, 4, {1: 0.01, 2: 0.02, 3: 0.03, 4: 0.04}),  # a round is an epoch
        (8, 4, {1: 0.02, 2: 0.04, 3: 0.06, 4: 0.08}),  # two local epochs a round: the even epochs
        (4, 8, {2: 0.01, 4: 0.02, 6: 0.03, 8: 0.04}),  # shorter rounds of local steps
        (16, 82, {5: 0.01, 10: 0.02, 15: 0.03, 20: 0.04, 82: 0.16}),  # 82 rounds of the same compute
    ],
)
def test_each_epoch_lands_on_the_round_of_the_same_compute(
    tmp_path: Path, epochs: int, rounds: int, expected: dict[int, float]
) -> None:
    shown = curve_on_rounds(tmp_path, epochs, rounds)
    assert {r: shown[r] for r in expected} == pytest.approx(expected)
    assert len(shown) == min(epochs, rounds)
