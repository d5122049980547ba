"""The strategy registry: every strategy is one object the config, the sites, the server, secure aggregation
and the replay ask; the trimmed mean equals its definition on hand-made numbers and holds out a planted
outlier that the average lets through."""

from __future__ import annotations

import numpy as np
import pytest

from shared.config import load_config
from shared.errors import ConfigError
from shared.federation.aggregation import Update, average
from shared.federation.strategies import STRATEGIES, trimmed_count, trimmed_mean

REFERENCE = {"encoder.w": np.zeros(3, np.float32), "encoder.n": np.array(0, np.int64)}


def update(site: str, w: list[float], n: int = 0, weight: float = 10.0, **heads: float) -> Update:
    arrays = {"encoder.w": np.array(w, np.float32), "encoder.n": np.array(n, np.int64)}
    return Update(site, arrays, weight, dict(heads))


def test_the_trimmed_mean_drops_each_coordinates_extremes_and_averages_the_rest() -> None:
    """Four sites, trim 0.25: per coordinate the largest and smallest go, the middle two are averaged
    (unweighted); the integer counter takes the maximum, as in the average."""
    sites = [
        update("a", [1, 10, -5], n=3),
        update("b", [2, 20, -6], n=7),
        update("c", [3, 30, -7], n=5, weight=1000.0),  # its forged weight buys it nothing
        update("d", [100, -40, 50], n=2),
    ]
    out = trimmed_mean(sites, REFERENCE, 0.25)
    assert np.allclose(out["encoder.w"], [(2 + 3) / 2, (10 + 20) / 2, (-6 + -5) / 2])
    assert out["encoder.n"] == 7 and out["encoder.w"].dtype == np.float32


def test_a_planted_outlier_moves_the_average_but_not_the_trimmed_mean() -> None:
    rng = np.random.default_rng(0)
    honest = [update(f"h{i}", list(1 + 0.1 * rng.standard_normal(3))) for i in range(4)]
    outlier = update("bad", [1000.0, -1000.0, 1000.0])  # finite, of the right shape: it passes validation
    fedavg = average([*honest, outlier], REFERENCE)["encoder.w"]
    robust = trimmed_mean([*honest, outlier], REFERENCE, 0.2)["encoder.w"]
    low = np.min([u.arrays["encoder.w"] for u in honest], axis=0)
    high = np.max([u.arrays["encoder.w"] for u in honest], axis=0)
    assert np.abs(fedavg - 1).max() > 100  # the average is dragged a fifth of the way to the outlier
    assert ((robust >= low) & (robust <= high)).all()  # the trimmed mean stays among the honest sites


def test_a_head_is_trimmed_among_its_holders_and_one_value_is_always_kept() -> None:
    head = {"heads.dr.w": np.zeros(2, np.float32)}
    held = [
        Update("a", {"heads.dr.w": np.array([1.0, 2.0], np.float32)}, 5, {"heads.dr.": 5}),
        Update("b", {"heads.dr.w": np.array([3.0, 4.0], np.float32)}, 5, {"heads.dr.": 5}),
        Update("c", {"heads.dr.w": np.array([9.0, 9.0], np.float32)}, 5, {"heads.dr.": 0}),  # holds no dr
    ]
    assert np.allclose(trimmed_mean(held, head, 0.49)["heads.dr.w"], [2.0, 3.0])  # c is no holder
    assert [trimmed_count(n, 0.49) for n in (1, 2, 3, 4, 5)] == [0, 0, 1, 1, 2]


def test_each_strategy_says_what_it_can_run_under() -> None:
    runs_secure = {n for n, s in STRATEGIES.items() if not s.not_secure}
    assert runs_secure == {"fedavg", "fedprox", "fedbn", "fedadam", "fedavgm"}
    assert {n for n, s in STRATEGIES.items() if s.not_private} == {"fedprox"}
    assert {n for n, s in STRATEGIES.items() if s.replayable} == {
        "fedavg",
        "fedprox",
        "fedbn",
        "trimmed-mean",
        "cyclic",
    }
    assert [n for n, s in STRATEGIES.items() if s.holds_replies] == ["trimmed-mean"]
    assert [n for n, s in STRATEGIES.items() if s.sequential] == ["cyclic"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"federation.strategy": "fedyogi"}, "unknown strategy 'fedyogi'; known strategies: fedavg, fedprox"),
        (
            {"federation.strategy": "trimmed-mean", "federation.secure_aggregation": True},
            "secure_aggregation: the trimmed mean needs every site's own update",
        ),
        ({"federation.carry_optimizer": True}, "carry_optimizer: the optimiser travels along the chain"),
        (
            {
                "federation.strategy": "fedprox",
                "privacy.enabled": True,
                "model.norm": "gn",
                "pretrain.loss_reduction": "sample",
            },
            "federation.strategy is refused under privacy.enabled=true: FedProx's term bypasses",
        ),
    ],
)
def test_the_config_asks_the_strategy_and_refuses_in_one_line(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        load_config(profile="tiny", overrides=overrides)
    assert "\n" not in str(refused.value)
