"""A site with several devices (`devices: 2`): real processes joined by a gloo process group train slices of
each batch and average their gradients. Where the maths allows (GroupNorm, no random draw per batch) that is
single-device training up to rounding; the replicas' weights are always bitwise equal to each other."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from client.rounds import train_round
from shared.config import load_config
from shared.data.site import Site, load_site
from shared.errors import ConfigError
from shared.federation.wire import FINETUNE, RoundSpec, RunSpec
from shared.training.finetune import build_task_model
from shared.training.replicas import Replica, check_devices, run_replicas
from tests.conftest import uid_of

TASKS = {"ad": 2, "pd": 2}


@pytest.fixture
def ukb(tiny_sites: dict[str, Path]) -> Site:
    return load_site(tiny_sites["ukb"])


def on_devices(site: Site, devices: int) -> Site:
    return dataclasses.replace(site, config=site.config.model_copy(update={"devices": devices}))


def _uneven_slices(replica: Replica) -> tuple[list[torch.Tensor | None], float, int]:
    """Rank 0 holds three samples, rank 1 one; only rank 0's loss reaches the second layer's bias."""
    torch.manual_seed(0)
    first, second = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    x = torch.arange(12.0).reshape(4, 3) / 10
    mine = x[:3] if replica.rank == 0 else x[3:]
    hidden = first(mine)
    loss = (second(hidden).sum() if replica.rank == 0 else hidden.sum()) / len(mine)
    loss.backward()
    params = [*first.parameters(), *second.parameters()]
    mean, images = replica.sync(params, float(loss.detach()), len(mine))
    return [p.grad for p in params], mean, images


def test_replicas_average_gradients_weighted_by_their_images() -> None:
    grads, mean, images = run_replicas(_uneven_slices, 2, (), cuda=False)
    torch.manual_seed(0)
    first, second = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    x = torch.arange(12.0).reshape(4, 3) / 10
    whole = (second(first(x[:3])).sum() + first(x[3:]).sum()) / 4  # the whole batch's mean loss
    whole.backward()
    expected = [p.grad for p in (*first.parameters(), *second.parameters())]
    assert images == 4 and mean == pytest.approx(float(whole))
    assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(grads, expected, strict=True))


def _ranks_agree(replica: Replica, site: Site, spec: RoundSpec, arrays: dict) -> tuple[list[str], dict]:
    from client.rounds import _train  # the same function a multi-device round runs on each device

    local = _train(site, spec, {k: torch.from_numpy(v) for k, v in arrays.items()}, replica=replica)
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in local.weights.values())).hexdigest()
    digests: list[str] = [""] * replica.world
    dist.all_gather_object(digests, digest)
    return digests, {k: v.numpy() for k, v in local.weights.items()}


def test_two_devices_train_what_one_does_with_groupnorm(ukb: Site) -> None:
    """SGD: an adaptive optimiser's first steps divide each gradient by its own size, which turns the
    rounding of a near-zero gradient into a whole step (measured with AdamW: 5e-4 against moves of 2e-3)."""
    overrides = {"model.norm": "gn", "federation.local_steps": 3, "finetune.optimizer": "sgd"}
    cfg = load_config(profile="tiny", overrides=overrides | {"finetune.lr": 0.05})
    start = build_task_model(cfg, TASKS).state_dict()

    def run(devices: int, name: str) -> tuple[dict[str, torch.Tensor], float]:
        spec = RoundSpec(RunSpec(cfg.model_copy(update={"name": name}), uid_of(name), ""), FINETUNE, 1, TASKS)
        trained = train_round(on_devices(ukb, devices), spec, start)
        assert trained.metrics["steps"] == 6  # three batches of each task, on both devices
        return trained.weights, trained.metrics["train-loss"]

    (one, loss_one), (two, loss_two) = run(1, "one"), run(2, "two")
    floats = [k for k in one if one[k].is_floating_point()]
    moved = max(float((one[k] - start[k]).abs().max()) for k in floats)
    differ = max(float((one[k] - two[k]).abs().max()) for k in floats)
    assert moved > 1e-2 and differ < 1e-5  # measured 3e-7 (two threads), 4e-6 (one) against moves of 4e-2
    assert loss_two == pytest.approx(loss_one, rel=1e-5)


def test_batchnorm_replicas_stay_bitwise_equal_to_each_other(ukb: Site) -> None:
    cfg = load_config(profile="tiny", overrides={"federation.local_steps": 2})
    spec = RoundSpec(RunSpec(cfg.model_copy(update={"name": "bn"}), uid_of("bn"), ""), FINETUNE, 1, TASKS)
    arrays = {k: v.numpy() for k, v in build_task_model(cfg, TASKS).state_dict().items()}
    digests, weights = run_replicas(_ranks_agree, 2, (on_devices(ukb, 2), spec, arrays), cuda=False)
    assert digests[0] == digests[1]
    assert any(not (weights[k] == arrays[k]).all() for k in arrays)


def test_a_private_multi_device_site_is_refused_in_one_line(ukb: Site) -> None:
    private = {"privacy.enabled": True, "model.norm": "gn", "pretrain.loss_reduction": "sample"}
    cfg = load_config(profile="tiny", overrides=private)
    spec = RoundSpec(RunSpec(cfg.model_copy(update={"name": "dp"}), uid_of("dp"), ""), FINETUNE, 1, TASKS)
    with pytest.raises(ConfigError, match=r"devices: 2 cannot train with DP-SGD.*set devices: 1"):
        train_round(on_devices(ukb, 2), spec, build_task_model(cfg, TASKS).state_dict())


def test_asking_for_more_gpus_than_the_machine_has_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"devices: 999 but this machine sees .* lower `devices`"):
        check_devices(999, cuda=True)
