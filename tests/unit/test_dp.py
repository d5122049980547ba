"""DP-SGD (shared/privacy) and a site's privacy policy (client/privacy.py), no Flower: epsilon composes
over rounds exactly as one accountant over all steps, the privacy object changes nothing else when it
neither clips nor adds noise, a patient's images together move an update by at most the clipping norm,
a site over budget refuses, and the ledger survives SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from client.privacy import SitePrivacy
from client.rounds import train_round
from shared.config import ExperimentConfig, load_config
from shared.data import partition
from shared.data.site import Site, load_site
from shared.errors import ConfigError, DataError
from shared.federation.wire import EPSILON, FINETUNE, PRETRAIN, RoundSpec, RunSpec
from shared.privacy.accounting import epsilon, noise_for
from shared.privacy.ledger import Ledger
from shared.privacy.sgd import PrivateSGD, unit_ids
from shared.training.data import site_images
from shared.training.finetune import build_task_model
from shared.training.initialisation import pretraining_start
from shared.training.phase import Span, run_phase
from shared.training.pretrain import spark_method
from tests.conftest import FEDRETINA, UID, uid_of

PRIVATE = {"privacy.enabled": True, "model.norm": "gn", "pretrain.loss_reduction": "sample"}


def private(**overrides: object) -> ExperimentConfig:
    return load_config(profile="tiny", overrides=PRIVATE | overrides)


def spec(cfg: ExperimentConfig, rnd: int, uid: str = UID) -> RoundSpec:
    return RoundSpec(RunSpec(cfg, uid, ""), PRETRAIN, rnd, {})


@pytest.fixture
def ukb(tiny_sites: dict[str, Path], tmp_path: Path) -> Site:
    """The tiny UKB site (8 participants, several images each) with its own empty state folder."""
    site = load_site(tiny_sites["ukb"])
    config = site.config.model_copy(update={"state_dir": tmp_path / "state"})
    return Site(site.name, config, site.rows)


def test_epsilon_after_k_rounds_equals_one_accountant_over_all_steps(ukb: Site) -> None:
    plan = {"federation.rounds_pretrain": 3, "federation.rounds_finetune": 0, "federation.local_steps": 1}
    cfg = private(**plan)
    weights = pretraining_start(cfg).state_dict()
    reported = []
    for rnd in (1, 2, 3):
        trained = train_round(ukb, spec(cfg, rnd), weights)
        weights = trained.weights
        reported.append(trained.metrics[EPSILON])
    ledger = Ledger(ukb.ledger_path)
    (plan,) = [e for e in ledger.entries() if e["kind"] == "plan"]
    once = RDPAccountant()
    once.history = [(plan["sigma"], 8 / len(ukb.rows), 3)]  # batch 8, one step a round
    assert reported[-1] == pytest.approx(once.get_epsilon(delta=1e-5), rel=1e-9)
    assert reported[0] < reported[1] < reported[2] <= 8.0  # composes; the plan spends the budget
    assert reported[2] > 0.95 * 8.0  # ... and nearly all of it: sigma is chosen once for the whole run
    fresh = RDPAccountant()
    fresh.history = [(plan["sigma"], 8 / len(ukb.rows), 1)]
    assert fresh.get_epsilon(delta=1e-5) == pytest.approx(reported[0])  # what a per-round engine reports
    releases = [e for e in ledger.entries() if e["kind"] == "release"]
    assert [e["round"] for e in releases] == [1, 2, 3] and {e["unit"] for e in releases} == {"patient"}


def test_a_private_finetune_round_spends_each_held_tasks_steps(ukb: Site) -> None:
    cfg = private(**{"privacy.noise_multiplier": 1.0, "federation.local_steps": 1})
    tasks = {"ad": 2, "dr": 5, "pd": 2}
    round_spec = RoundSpec(RunSpec(cfg, UID, ""), FINETUNE, 1, tasks)
    trained = train_round(ukb, round_spec, build_task_model(cfg, tasks).state_dict())
    assert trained.metrics["steps"] == 2 and trained.metrics["dr-num-examples"] == 0  # ad and pd, one each
    (release,) = [e for e in Ledger(ukb.ledger_path).entries() if e["kind"] == "release"]
    images = {t: trained.metrics[f"{t}-num-examples"] for t in ("ad", "pd")}
    assert release["mechanisms"] == [[1.0, 8 / images["ad"], 1], [1.0, 8 / images["pd"], 1]]
    assert trained.metrics[EPSILON] == pytest.approx(epsilon([tuple(m) for m in release["mechanisms"]], 1e-5))


@pytest.mark.parametrize("unit", ["patient", "image"])
def test_without_noise_or_clipping_dp_training_equals_the_plain_groupnorm_run(ukb: Site, unit: str) -> None:
    """With one batch holding every image (q = 1), sigma 0 and a clip never reached, DP-SGD is SGD."""
    n = len(ukb.rows)
    base = load_config(
        profile="tiny",
        overrides={"model.norm": "gn", "pretrain.loss_reduction": "sample", "pretrain.batch_size": n},
    )
    runs = []
    for privacy in (None, PrivateSGD(0.0, 1e12, unit, n)):
        torch.manual_seed(0)
        model = pretraining_start(base)
        data = {"": site_images(ukb, base, base.data.image_size, "light")}
        result = run_phase(
            spark_method(model, base, torch.device("cpu")),
            data,
            Span.epochs(2),
            seed=1,
            key="ukb",
            privacy=privacy,
        )
        assert result.steps == 2
        runs.append(model.state_dict())
    plain, dp = runs
    for key in plain:
        assert torch.allclose(plain[key], dp[key], rtol=1e-4, atol=1e-6), key
    assert any(
        not torch.equal(plain[k], pretraining_start(base).state_dict()[k]) for k in plain
    )  # it trained


def one_step_update(model: torch.nn.Module, batch: dict[str, torch.Tensor], sgd: PrivateSGD) -> torch.Tensor:
    """The weights' change after one private SGD(lr 1) step on `batch` through the loop's calls."""
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with sgd.attached(model, optimizer) as dp:
        dp.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(batch["image"], "dr"), batch["label"])
        loss.backward()
        sgd.before_step(batch)
        dp.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


@pytest.mark.parametrize(("unit", "bounded"), [("patient", True), ("image", False)])
def test_one_patients_images_together_move_the_update_by_at_most_the_clip(unit: str, bounded: bool) -> None:
    cfg = private()
    torch.manual_seed(0)
    start = build_task_model(cfg, {"dr": 5}).state_dict()
    images, labels = torch.randn(10, 3, 64, 64), torch.randint(0, 5, (10,))
    patients = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 2, 3])  # patient 0: seven images (visits, both eyes)
    units = patients if unit == "patient" else torch.arange(10)  # as `unit_ids` labels a batch's images
    clip = 0.05  # well under every image's gradient norm: clipping is active
    updates = []
    for keep in (slice(None), slice(7, None)):  # with patient 0, then without
        model = build_task_model(cfg, {"dr": 5})
        model.load_state_dict(start)
        batch = {"image": images[keep], "label": labels[keep], "unit": units[keep]}
        sgd = PrivateSGD(0.0, clip, unit, batch_size=10)
        updates.append(one_step_update(model, batch, sgd))
    moved = float(torch.linalg.vector_norm(updates[0] - updates[1])) * 10  # undo the 1 / batch_size
    assert (moved <= clip * (1 + 1e-4)) == bounded, moved  # image level: each image moves it by up to clip


def test_patient_units_group_a_sites_images_by_patient(ukb: Site) -> None:
    data = site_images(ukb, private(), 64, "none")
    units = unit_ids(data, "patient")
    assert len(set(units)) == ukb.rows["patient_id"].nunique() < len(units)
    assert (unit_ids(data, "image") == np.arange(len(ukb.rows))).all()


def test_a_site_over_its_budget_refuses_with_its_reason_and_the_same_metric_keys(ukb: Site) -> None:
    cfg = private(**{"federation.rounds_pretrain": 3, "privacy.noise_multiplier": 1.0})
    tight = ukb.config.model_copy(
        update={"privacy": ukb.config.privacy.model_copy(update={"target_epsilon": 6.0})}
    )
    site = Site(ukb.name, tight, ukb.rows)
    weights = pretraining_start(cfg).state_dict()
    first = train_round(site, spec(cfg, 1), weights)
    assert first.refused is None and first.metrics[EPSILON] < 6.0
    second = train_round(site, spec(cfg, 2), first.weights)
    assert second.weights is None and second.refused.startswith("privacy budget exhausted: epsilon ")
    assert "> the site's target 6" in second.refused and "unit patient" in second.refused
    assert second.metrics.keys() == first.metrics.keys() and second.metrics[EPSILON] == first.metrics[EPSILON]
    kinds = [e["kind"] for e in Ledger(site.ledger_path).entries()]
    assert kinds == ["release", "refused"]  # a fixed sigma needs no plan; the refusal is on record


def test_a_budget_already_spent_leaves_no_noise_to_plan() -> None:
    spent = [(1.0, 0.5, 40)]
    assert epsilon(spent, 1e-5) > 3
    assert noise_for(3.0, 1e-5, spent, [(0.5, 2)]) is None
    sigma = noise_for(30.0, 1e-5, spent, [(0.5, 2)])
    assert sigma is not None and epsilon([*spent, (sigma, 0.5, 2)], 1e-5) <= 30.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model.norm", "bn"),
        ("pretrain.method", "moco"),
        ("pretrain.loss_reduction", "batch"),
        ("finetune.mixup", 0.2),
        ("finetune.cutmix", 1.0),
        ("finetune.class_weighting", True),
        ("federation.strategy", "fedprox"),
    ],
)
def test_what_dp_forbids_is_refused_in_one_line_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        private(**{key: value})
    message = str(info.value)
    assert (
        message.startswith(f"config: {key} is refused under privacy.enabled=true: ") and "\n" not in message
    )


WRITER = """
import sys
from pathlib import Path
from shared.privacy.ledger import Ledger
ledger = Ledger(Path(sys.argv[1]))
for i in range(100000):
    ledger.append("release", round=i, mechanisms=[[1.0, 0.1, 1]], padding="x" * 500)
"""


def test_the_ledger_survives_sigkill_at_any_point(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    seen = 0
    for wait in (0.0, 0.1):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=Path(__file__).parents[2])
        while len(Ledger(path).entries()) <= seen:  # let it write (and rewrite) a while, then kill it
            time.sleep(0.01)
        time.sleep(wait)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        entries = Ledger(path).entries()  # parses: never a torn line
        assert len(entries) >= seen and [e["round"] for e in entries[seen:]] == list(
            range(len(entries) - seen)
        )
        seen = len(entries)
    assert seen > 0
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(DataError, match=rf"{path.name}:{seen + 1}: not a ledger entry"):
        Ledger(path).entries()
    json.loads(path.read_text().splitlines()[0])  # the earlier entries are untouched


def test_site_privacy_prints_the_ledger_with_its_unit_and_the_group_bound(
    tiny_sites: dict[str, Path], tmp_path: Path
) -> None:
    import yaml

    data = yaml.safe_load(tiny_sites["ukb"].read_text())
    data |= {
        "root": str((tiny_sites["ukb"].parent / data["root"]).resolve()),
        "state_dir": str(tmp_path / "state"),
        "privacy": {"target_epsilon": 20.0, "delta": 1e-6},
    }
    site_yaml = tmp_path / "ukb.yaml"
    site_yaml.write_text(yaml.safe_dump(data))
    site = load_site(site_yaml)
    cfg = private(**{"privacy.unit": "image", "federation.rounds_pretrain": 2, "federation.local_steps": 1})
    weights = pretraining_start(cfg).state_dict()
    for rnd in (1, 2):
        weights = train_round(site, spec(cfg, rnd), weights).weights
    result = subprocess.run([FEDRETINA, "site", "privacy", str(site_yaml)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    spent = Ledger(site.ledger_path).epsilon(1e-6)
    assert "site ukb: budget epsilon 20 at delta 1e-06" in out
    assert "| run | ukb | pretrain | 1-2 | 2 | " in out  # run name "run", both rounds, one step each
    assert f"epsilon spent (worst-off patient): {spent:.3f} of 20 " in out and "privacy unit: image" in out
    largest = int(site.rows.groupby("patient_id").size().max())
    assert f"a patient with {largest} images here is protected at epsilon {largest * spent:.3f}" in out


def test_a_simulated_part_is_charged_what_earlier_runs_spent_on_its_patients(ukb: Site) -> None:
    """The iid split deals patients by the run's seed: under another seed a patient sits in another part,
    and must still carry what the first run released on them (and a part of others, nothing)."""
    cfg = private(
        **{"privacy.noise_multiplier": 1.0, "federation.rounds_pretrain": 1, "federation.local_steps": 1}
    )

    def parts(seed: int) -> list[Site]:
        masks = partition.iid(ukb.rows, 2, seed)
        return [
            Site(f"ukb-iid{k}", ukb.config, ukb.rows[m].reset_index(drop=True)) for k, m in enumerate(masks)
        ]

    first = parts(0)[0]
    trained = train_round(first, spec(cfg, 1, uid_of("seed 0")), pretraining_start(cfg).state_dict())
    spent = trained.metrics[EPSILON]
    assert spent > 0
    used = set(first.rows["patient_id"])
    later = parts(3)
    assert all(used & set(p.rows["patient_id"]) for p in later)  # the seed moved patients across parts
    mixed = [p for p in later if set(p.rows["patient_id"]) != used]
    assert mixed  # a part that is not the first run's
    for part in later:
        assert SitePrivacy(part, spec(cfg, 1, uid_of("seed 3"))).epsilon == pytest.approx(spent)
    fresh = ukb.rows[~ukb.rows["patient_id"].isin(used)].reset_index(drop=True)
    untouched = Site("ukb-iid1", ukb.config, fresh)  # the first run's other part: patients it never used
    assert SitePrivacy(untouched, spec(cfg, 1, uid_of("seed 3"))).epsilon == 0.0


def test_a_refusal_on_a_spent_budget_keeps_the_ledger_strict_json(ukb: Site) -> None:
    """No noise can keep the run within the budget: the refusal is recorded with `projected: null`, never
    Infinity (which is not JSON), and the ledger refuses any non-finite number written to it."""
    cfg = private(**{"federation.rounds_pretrain": 1})
    tiny = ukb.config.model_copy(
        update={"privacy": ukb.config.privacy.model_copy(update={"target_epsilon": 1e-9})}
    )
    site = Site(ukb.name, tiny, ukb.rows)
    refused = train_round(site, spec(cfg, 1), pretraining_start(cfg).state_dict())
    assert refused.weights is None and "no noise keeps this run within" in str(refused.refused)

    def strict(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    entries = [json.loads(line, parse_constant=strict) for line in site.ledger_path.read_text().splitlines()]
    assert [(e["kind"], e["projected"]) for e in entries] == [("refused", None)]
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        Ledger(site.ledger_path).append("release", epsilon=float("inf"))
