"""The strategy registry: every strategy is one object the config, the sites, the server, secure aggregation
and the replay ask; the trimmed mean equals its definition on hand-made numbers and holds out a planted
outlier that the average lets through; MimeLite's site steps with the server's moments unchanged, and the
server's average of two sites' replies is the centralised optimiser's state over their pooled gradients;
SCAFFOLD's site steps along g - c_i + c and the server's control variate is the average of the sites'."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.config import load_config
from shared.errors import ConfigError
from shared.federation.aggregation import RunningAverage, Update, average, moments_start
from shared.federation.strategies import STRATEGIES, trimmed_count, trimmed_mean
from shared.training.control import ControlVariates
from shared.training.moments import CONTROL, ENTRIES, MimeMoments

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
    assert [n for n, s in STRATEGIES.items() if s.server_moments] == ["mime"]
    assert [n for n, s in STRATEGIES.items() if s.server_state] == ["mime", "scaffold"]
    assert {n for n, s in STRATEGIES.items() if s.not_private} == {"fedprox", "scaffold"}
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
            {"federation.strategy": "mime", "finetune.optimizer": "sgd"},
            "finetune.optimizer: strategy mime hands the server's Adam moments to the sites",
        ),
        (
            {"federation.strategy": "mime", "federation.secure_aggregation": True},
            "secure_aggregation: the moments travel beside the masked sum",
        ),
        (
            {"federation.strategy": "scaffold", "federation.secure_aggregation": True},
            "secure_aggregation: the control variates travel beside the masked sum",
        ),
        (
            {
                "federation.strategy": "scaffold",
                "privacy.enabled": True,
                "model.norm": "gn",
                "pretrain.loss_reduction": "sample",
            },
            "federation.strategy is refused under privacy.enabled=true: a control variate is the mean of",
        ),
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


# ------------------------------------------------------------------------------------------- MimeLite
LR, BETAS, EPS, DECAY = 0.1, (0.9, 0.99), 1e-8, 0.01


def _site_round(server: dict[str, torch.Tensor], batches: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """One site's round of MimeLite on a linear model w.x with loss 0.5 (w.x - 1)^2, one batch a step."""
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.2, 0.1]]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY)
    mime = MimeMoments(model, server)
    mime.attach(optimizer)
    for x in batches:
        optimizer.zero_grad()
        (0.5 * (model(x) - 1) ** 2).mean().backward()
        optimizer.step()
    return model.weight.detach().clone(), mime.moments({"weight"})


def test_a_mime_site_steps_with_the_servers_moments_unchanged() -> None:
    """Two local steps by hand: each uses m' = b1 m_s + (1-b1) g and v' = b2 v_s + (1-b2) g^2 from the
    server's (m_s, v_s, t_s), bias-corrected at t_s + 1, never the first step's moments; the moments it
    returns are b^K m_s + (1 - b^K) mean(g), step t_s + K."""
    m_s, v_s, t_s = torch.tensor([[0.3, -0.1, 0.2]]), torch.tensor([[0.04, 0.02, 0.01]]), 7.0
    server = {"weight/exp_avg": m_s, "weight/exp_avg_sq": v_s, "weight/step": torch.tensor(t_s)}
    batches = [torch.tensor([[1.0, 2.0, -1.0]]), torch.tensor([[0.5, -1.0, 2.0]])]
    got, moments = _site_round(server, batches)
    (b1, b2), t = BETAS, t_s + 1
    m_s, v_s = m_s.double(), v_s.double()
    w, grads = torch.tensor([[0.5, -0.2, 0.1]], dtype=torch.float64), []
    for x in batches:
        g = ((w * x).sum() - 1) * x  # the loss's gradient at the current weights
        grads.append(g)
        m, v = b1 * m_s + (1 - b1) * g, b2 * v_s + (1 - b2) * g * g
        w = w * (1 - LR * DECAY) - LR * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + EPS)
    assert torch.allclose(got.double(), w, atol=1e-6)
    mean, square = sum(grads) / 2, sum(g * g for g in grads) / 2
    assert torch.allclose(moments["weight/exp_avg"].double(), b1**2 * m_s + (1 - b1**2) * mean, atol=1e-6)
    assert torch.allclose(
        moments["weight/exp_avg_sq"].double(), b2**2 * v_s + (1 - b2**2) * square, atol=1e-7
    )
    assert float(moments["weight/step"]) == t_s + 2


def test_a_mime_site_without_server_moments_starts_adam_afresh_at_every_step() -> None:
    """Round 1: no server state; every step is Adam's first step (m = (1-b1) g, bias-corrected to g)."""
    x = torch.tensor([[1.0, 2.0, -1.0]])
    got, moments = _site_round({}, [x, x])
    w = torch.tensor([[0.5, -0.2, 0.1]], dtype=torch.float64)
    for _ in range(2):
        g = ((w * x).sum() - 1) * x
        w = w * (1 - LR * DECAY) - LR * g / (g.abs() + EPS)
    assert torch.allclose(got.double(), w, atol=1e-6) and float(moments["weight/step"]) == 2


def test_the_servers_average_of_two_mime_sites_is_the_optimiser_over_their_pooled_gradients() -> None:
    """Sites a (1 example) and b (3), K steps each from the same server state: the example-weighted
    average the server takes (`moments_start` + RunningAverage) is b^K m + (1 - b^K) x the pooled mean
    gradient (and mean square): linear, so it is what one optimiser would hold over both sites' gradients."""
    reference = {"encoder.w": np.zeros(2, np.float32)}
    m, v, k = np.array([0.2, -0.4], np.float32), np.array([0.1, 0.3], np.float32), 4
    start = moments_start(reference, {"encoder.w/exp_avg": m, "encoder.w/exp_avg_sq": v}, ENTRIES["adamw"])
    assert float(start["encoder.w/step"]) == 0.0  # what the server never held starts fresh
    (b1, b2), grads = BETAS, {"a": np.array([1.0, -2.0]), "b": np.array([3.0, 0.5])}
    squares = {"a": np.array([1.5, 4.5]), "b": np.array([9.5, 0.5])}
    running = RunningAverage(start)
    for site, weight in (("a", 1.0), ("b", 3.0)):
        reply = {
            "encoder.w/exp_avg": (b1**k * m + (1 - b1**k) * grads[site]).astype(np.float32),
            "encoder.w/exp_avg_sq": (b2**k * v + (1 - b2**k) * squares[site]).astype(np.float32),
            "encoder.w/step": np.array(k, np.float32),
        }
        running.add(Update(site, reply, weight))
    out = running.result()
    pooled, pooled_sq = (grads["a"] + 3 * grads["b"]) / 4, (squares["a"] + 3 * squares["b"]) / 4
    assert np.allclose(out["encoder.w/exp_avg"], b1**k * m + (1 - b1**k) * pooled, atol=1e-6)
    assert np.allclose(out["encoder.w/exp_avg_sq"], b2**k * v + (1 - b2**k) * pooled_sq, atol=1e-6)
    assert float(out["encoder.w/step"]) == k


@pytest.mark.parametrize(
    "server",
    [
        {"weight/exp_avg": torch.zeros(5)},  # another shape
        {"bias/exp_avg": torch.zeros(1)},  # no parameter of the model
        {"weight/momentum_buffer": torch.zeros(1, 3)},  # not an Adam entry
        {"weight/exp_avg_sq": torch.full((1, 3), float("nan"))},
    ],
)
def test_a_mime_site_refuses_server_moments_that_do_not_fit_its_model(server: dict) -> None:
    with pytest.raises(ConfigError, match="the server's optimiser moments"):
        _site_round(server, [torch.ones(1, 3)])


# ------------------------------------------------------------------------------------------- SCAFFOLD
W0, ETA = [0.5, -0.2, 0.1], 0.1


def _gradient(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The gradient of 0.5 (w.x - 1)^2 (mean over the batch's rows) at w, by hand."""
    return ((x @ w - 1)[:, None] * x).mean(0)


def _scaffold_round(server: dict, own: dict, batches: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """One site's round of SCAFFOLD with plain SGD on the linear model w.x, one batch a step."""
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([W0]))
    optimizer = torch.optim.SGD(model.parameters(), lr=ETA)
    control = ControlVariates(model, server, own)
    control.attach(optimizer)
    for x in batches:
        optimizer.zero_grad()
        (0.5 * (model(x) - 1) ** 2).mean().backward()
        optimizer.step()
    return model.weight.detach().clone()[0], control.controls({"weight"})


def test_a_scaffold_site_steps_along_its_gradient_corrected_by_the_two_control_variates() -> None:
    """The paper's local step y <- y - eta (g(y) - c_i + c), twice; the site's new c_i is the mean of the
    raw gradients it took (option I, along the round)."""
    c, c_i = torch.tensor([0.3, -0.1, 0.2]), torch.tensor([-0.2, 0.4, 0.0])
    batches = [torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]]), torch.tensor([[2.0, 0.0, 1.0]])]
    got, controls = _scaffold_round({"weight/control": c[None]}, {"weight/control": c_i[None]}, batches)
    w, raw = torch.tensor(W0), []
    for x in batches:
        raw.append(_gradient(w, x))
        w = w - ETA * (raw[-1] - c_i + c)
    assert torch.allclose(got, w, atol=1e-6)
    assert list(controls) == [f"weight/{CONTROL}"]
    assert torch.allclose(controls["weight/control"][0], (raw[0] + raw[1]) / 2, atol=1e-6)


def test_a_scaffold_site_with_equal_control_variates_steps_as_plain_sgd() -> None:
    """c = c_i (a site at the federation's mean, or the first round, where both are zero) is FedAvg's step."""
    batches = [torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.0, 1.0, 1.0]])]
    same = {"weight/control": torch.tensor([[0.3, -0.1, 0.2]])}
    first, _ = _scaffold_round({}, {}, batches)
    equal, _ = _scaffold_round(same, same, batches)
    w = torch.tensor(W0)
    for x in batches:
        w = w - ETA * _gradient(w, x)
    assert torch.allclose(first, w, atol=1e-6) and torch.allclose(equal, w, atol=1e-6)


def test_the_servers_control_variate_is_the_example_weighted_average_of_the_sites() -> None:
    """The server starts each round from its control variate (zero where it holds none) and replaces it by
    the average of the sites' new ones, weighted by their examples: under full participation and equal
    sites, the paper's c + mean(c_i+ - c_i) with c = mean(c_i)."""
    reference = {"encoder.w": np.zeros(2, np.float32), "encoder.v": np.zeros(1, np.float32)}
    start = moments_start(reference, {"encoder.v/control": np.array([0.7], np.float32)}, {CONTROL})
    assert set(start) == {"encoder.w/control", "encoder.v/control"} and not start["encoder.w/control"].any()
    running = RunningAverage(start)
    a, b = np.array([1.0, -2.0], np.float32), np.array([3.0, 0.5], np.float32)
    running.add(Update("a", {"encoder.w/control": a}, 1.0))
    running.add(Update("b", {"encoder.w/control": b}, 3.0))
    out = running.result()
    assert np.allclose(out["encoder.w/control"], (a + 3 * b) / 4)
    assert out["encoder.v/control"] == pytest.approx(0.7)  # a parameter no site trained keeps its variate


@pytest.mark.parametrize(
    "server",
    [
        {"weight/control": torch.zeros(5)},  # another shape
        {"bias/control": torch.zeros(1)},  # no parameter of the model
        {"weight/exp_avg": torch.zeros(1, 3)},  # not a control variate
        {"weight/control": torch.full((1, 3), float("inf"))},
    ],
)
def test_a_scaffold_site_refuses_server_control_variates_that_do_not_fit_its_model(server: dict) -> None:
    with pytest.raises(ConfigError, match="the control variate"):
        _scaffold_round(server, {}, [torch.ones(1, 3)])
