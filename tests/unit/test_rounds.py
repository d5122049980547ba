"""A site's round (client/rounds.py, no Flower) and the phase loop under it: local steps continue epochs
across rounds exactly, the FedProx term pulls towards the round's starting weights, and the site keeps its
state (optimiser moments, FedBN layers, progress) in its own folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.rounds import round_span, train_round
from client.state import SiteState
from shared.config import ExperimentConfig, load_config
from shared.data.site import load_site
from shared.federation.aggregation import bn_keys
from shared.federation.wire import FINETUNE, PRETRAIN, RoundSpec, RunSpec
from shared.training.initialisation import pretraining_start
from shared.training.loop import proximal_penalty, step_plan
from shared.training.phase import Piece, Span
from tests.conftest import uid_of


def spec(cfg: ExperimentConfig, rnd: int, name: str, phase: str = PRETRAIN) -> RoundSpec:
    return RoundSpec(RunSpec(cfg.model_copy(update={"name": name}), uid_of(name), ""), phase, rnd, {})


def test_step_plan_windows_cover_a_run_of_epochs() -> None:
    assert step_plan(0, 5, 5) == [(0, 0, 5)]
    assert step_plan(3, 5, 5) == [(0, 3, 2), (1, 0, 3)]
    assert step_plan(12, 2, 5) == [(2, 2, 2)]
    assert sum(n for *_, n in step_plan(7, 23, 4)) == 23


def test_a_rounds_span_is_epochs_then_tasks_or_steps_per_task() -> None:
    epochs = Span.round(2, 4, local_epochs=2, local_steps=0)
    assert epochs.pieces({"dr": 3, "mmac": 5}) == [
        Piece("dr", 2, 0, 3),
        Piece("mmac", 2, 0, 5),
        Piece("dr", 3, 0, 3),
        Piece("mmac", 3, 0, 5),
    ]
    assert epochs.global_steps({"dr": 3, "mmac": 5}) == (16, 64)
    steps = Span.round(2, 4, local_epochs=2, local_steps=4)
    assert steps.pieces({"dr": 3, "mmac": 5}) == [
        Piece("dr", 1, 1, 2),
        Piece("dr", 2, 0, 2),
        Piece("mmac", 0, 4, 1),
        Piece("mmac", 1, 0, 3),
    ]
    assert steps.global_steps({"dr": 3, "mmac": 5}) == (8, 32)
    assert Span.epochs(8, start=3).pieces({"": 2}) == [Piece("", e, 0, 2) for e in range(3, 8)]


def test_each_phase_takes_its_own_local_steps() -> None:
    """Short pretraining rounds beside epoch-long fine-tuning rounds (what compare derives): the fine-tuning
    phase reads local_steps_finetune, 0 meaning its epochs, and falls back to local_steps when unset."""
    rounds = {"federation.rounds_pretrain": 4, "federation.rounds_finetune": 4}
    short = rounds | {"federation.local_steps": 3, "federation.local_steps_finetune": 0}
    cfg = load_config(profile="tiny", overrides=short)
    assert round_span(spec(cfg, 2, "a")) == Span(3, 6, 12, steps=True)
    assert round_span(spec(cfg, 2, "a", FINETUNE)) == Span(1, 2, 4)
    both = load_config(profile="tiny", overrides=rounds | {"federation.local_steps": 3})
    assert round_span(spec(both, 2, "a", FINETUNE)).steps


@pytest.fixture
def ukb(tiny_sites: dict[str, Path]):
    return load_site(tiny_sites["ukb"])


def start(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    return pretraining_start(cfg).state_dict()


def test_two_rounds_of_half_an_epoch_equal_one_round_of_one_epoch(ukb) -> None:
    cfg = load_config(profile="tiny", overrides={"federation.rounds_pretrain": 1})
    first_round = train_round(ukb, spec(cfg, 1, "a"), start(cfg))
    one_epoch, metrics = first_round.weights, first_round.metrics
    assert metrics["steps"] == 2  # 19 images, batch 8: two full batches per epoch
    halves = cfg.model_copy(
        update={"federation": cfg.federation.model_copy(update={"rounds_pretrain": 2, "local_steps": 1})}
    )
    middle = train_round(ukb, spec(halves, 1, "b"), start(cfg)).weights  # optimiser state: the site's folder
    two_halves = train_round(ukb, spec(halves, 2, "b"), middle).weights
    assert all(torch.equal(one_epoch[k], two_halves[k]) for k in one_epoch)
    progress = (ukb.federation_dir / uid_of("b") / "pretrain-progress.json").read_text()
    assert '"round": 2' in progress and '"step": 2' in progress


def test_fedbn_sites_keep_their_own_batchnorm_across_rounds(ukb) -> None:
    cfg = load_config(
        profile="tiny", overrides={"federation.strategy": "fedbn", "federation.rounds_pretrain": 2}
    )
    first = train_round(ukb, spec(cfg, 1, "fedbn"), start(cfg)).weights
    keys = {k for k in bn_keys(pretraining_start(cfg)) if first[k].is_floating_point()}
    server = {k: torch.zeros_like(v) if k in keys else v for k, v in first.items()}  # an average unlike ours
    from_server = train_round(ukb, spec(cfg, 2, "fedbn"), server).weights
    from_own = train_round(ukb, spec(cfg, 2, "fedbn"), first).weights
    # round 2 starts from the site's own BatchNorm of round 1 whatever the server sends for it
    assert all(torch.equal(from_server[k], from_own[k]) for k in first)
    state = SiteState(ukb, spec(cfg, 2, "fedbn"))
    assert sorted(p.name for p in state.dir.glob("pretrain-bn-*")) == [
        "pretrain-bn-r0001.safetensors",
        "pretrain-bn-r0002.safetensors",
    ]


def test_a_site_that_sat_rounds_out_continues_from_its_own_last_round(ukb, caplog) -> None:
    """Partial participation: a FedBN site back in round 4 after round 1 trains from its own BatchNorm and
    moments of round 1, never from files of rounds after the one it resumes from (a resumed server's re-run
    round), and keeps its last three rounds."""
    cfg = load_config(
        profile="tiny", overrides={"federation.strategy": "fedbn", "federation.rounds_pretrain": 6}
    )
    first = train_round(ukb, spec(cfg, 1, "sampled"), start(cfg)).weights
    keys = {k for k in bn_keys(pretraining_start(cfg)) if first[k].is_floating_point()}
    server = {k: torch.zeros_like(v) if k in keys else v for k, v in first.items()}
    from_server = train_round(ukb, spec(cfg, 4, "sampled"), server).weights
    from_own = train_round(ukb, spec(cfg, 4, "sampled"), first).weights  # round 4's own files exist by now
    assert all(torch.equal(from_server[k], from_own[k]) for k in first)
    assert "no optimiser state" not in caplog.text
    for rnd in (5, 6):
        train_round(ukb, spec(cfg, rnd, "sampled"), from_own)
    state = SiteState(ukb, spec(cfg, 6, "sampled"))
    assert sorted(p.name for p in state.dir.glob("pretrain-bn-*")) == [  # its last three
        "pretrain-bn-r0004.safetensors",
        "pretrain-bn-r0005.safetensors",
        "pretrain-bn-r0006.safetensors",
    ]


def test_proximal_penalty_pulls_towards_the_round_start() -> None:
    model = torch.nn.Linear(3, 2)
    penalty = proximal_penalty(model, mu=0.5)
    assert penalty is not None and proximal_penalty(model, 0.0) is None
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    model.zero_grad()
    penalty().backward()
    assert torch.allclose(model.weight.grad, 0.5 * (model.weight.detach() - start))
