"""A site's round (client/local.py, no Flower): local steps continue epochs across rounds exactly, the
FedProx term pulls towards the round's starting weights, and the site keeps its state in its own folder."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from client.local import RoundSpec, pretrain_round, work_plan
from shared.config import load_config
from shared.data.checks import load_site
from shared.seeding import derive_seed, seed_everything
from shared.training.loop import proximal_penalty, step_plan
from shared.training.pretrain import build_spark


def test_step_plan_windows_cover_a_run_of_epochs() -> None:
    assert step_plan(0, 5, 5) == [(0, 0, 5)]
    assert step_plan(3, 5, 5) == [(0, 3, 2), (1, 0, 3)]
    assert step_plan(12, 2, 5) == [(2, 2, 2)]
    assert sum(n for *_, n in step_plan(7, 23, 4)) == 23


def test_work_plan_epochs_then_tasks_or_steps_per_task() -> None:
    spec = RoundSpec(
        "finetune", 2, 4, local_epochs=2, local_steps=0, proximal_mu=0, strategy="fedavg", run_name="r"
    )
    plan, start, total = work_plan(spec, {"dr": 3, "mmac": 5})
    assert plan == [("dr", 2, (0, 3)), ("mmac", 2, (0, 5)), ("dr", 3, (0, 3)), ("mmac", 3, (0, 5))]
    assert (start, total) == (16, 64)
    steps = replace(spec, local_steps=4)
    plan, start, total = work_plan(steps, {"dr": 3, "mmac": 5})
    assert plan == [("dr", 1, (1, 2)), ("dr", 2, (0, 2)), ("mmac", 0, (4, 1)), ("mmac", 1, (0, 3))]
    assert (start, total) == (8, 32)


def test_two_rounds_of_half_an_epoch_equal_one_round_of_one_epoch(
    tiny_sites: dict[str, Path], tmp_path: Path
) -> None:
    site = load_site(tiny_sites["ukb"])
    cfg = load_config(profile="tiny")
    seed_everything(derive_seed(cfg.seed, "init"))
    start = build_spark(cfg).state_dict()
    whole = RoundSpec(
        "pretrain", 1, 1, local_epochs=1, local_steps=0, proximal_mu=0, strategy="fedavg", run_name="a"
    )
    one_epoch, metrics = pretrain_round(site, cfg, whole, start)
    assert metrics["steps"] == 2  # 19 images, batch 8: two full batches per epoch
    half = replace(whole, total_rounds=2, local_steps=1, run_name="b")
    middle, _ = pretrain_round(
        site, cfg, half, start
    )  # the optimiser state travels through the site's folder
    two_halves, _ = pretrain_round(site, cfg, replace(half, round=2), middle)
    assert all(torch.equal(one_epoch[k], two_halves[k]) for k in one_epoch)
    progress = (site.state / "b" / half.run_uid / "pretrain-progress.json").read_text()
    assert '"round": 2' in progress and '"step": 2' in progress


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
