"""Private federated training through the real `flwr run .`: two sites with their own budgets, the server
SIGKILLed mid-run (taking the simulated sites with it) and resumed.

Each site's ledger is append-only across the kill and the resume (re-run rounds were really released, so
they count again), the restarted sites continue composing, epsilon in every reply equals Opacus's
accountant over all the steps in the ledger, and the site whose budget runs out is refused with its
reason in the store while the run completes with the other.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from opacus.accountants import RDPAccountant

from shared.privacy.ledger import Ledger
from tests.conftest import ROOT
from tests.integration.flower import Flower, sets

pytestmark = pytest.mark.integration


def with_budget(site_yaml: Path, out: Path, target: float) -> Path:
    """A copy of a site YAML with its own privacy budget and an empty state folder."""
    data = yaml.safe_load(site_yaml.read_text())
    data |= {
        "root": str((site_yaml.parent / data["root"]).resolve()),
        "state_dir": str(out.parent / "state" / data["name"]),
        "privacy": {"target_epsilon": target, "delta": 1e-5},
    }
    out.write_text(yaml.safe_dump(data))
    return out


def replies(run: Path) -> list[tuple[str, int, str, int, str, dict]]:
    db = sqlite3.connect(run / "federation" / "store.sqlite")
    try:
        rows = db.execute(
            "SELECT phase, round, site, accepted, reason, metrics FROM replies WHERE kind = 'train' "
            "ORDER BY rowid"
        ).fetchall()
    finally:
        db.close()
    return [(*r[:5], json.loads(r[5])) for r in rows]


# Back in `make test`: its resumed simulation's missed heartbeats under the suite were the Ray-cluster test's
# teardown (`ray stop --force` killed every Ray process on the machine), fixed in simulation/flower_env.py
# and tests/integration/test_ray_cluster.py.
def test_private_federation_keeps_every_sites_ledger_across_a_kill_and_a_resume(
    tiny_sites: dict[str, Path], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    ample = with_budget(tiny_sites["ukb"], tmp_path / "ukb.yaml", 50.0)
    tight = with_budget(tiny_sites["aptos"], tmp_path / "aptos.yaml", 4.5)  # one round of sigma 1 fits
    plan = tmp_path / "private.yaml"
    plan.write_text(yaml.safe_dump({"name": "private", "sites": [str(ample), str(tight)]}))
    runs = tmp_path / "runs"
    config = {
        "profile": "tiny",
        "scenario": str(plan),
        "run-name": "dp",
        "set": sets(
            runs_dir=runs,
            threads=1,
            privacy__enabled="true",
            privacy__noise_multiplier=1.0,
            model__norm="gn",
            pretrain__loss_reduction="sample",
            federation__rounds_pretrain=3,
            federation__local_steps=1,
            federation__min_sites=1,
        ),
    }
    fl = Flower(tmp_path_factory.mktemp("flwr-home-dp"), ROOT)
    ledgers = {
        name: Ledger(tmp_path / "state" / name / "privacy" / f"{name}.jsonl") for name in ("ukb", "aptos")
    }
    first = runs / "dp" / "federation" / "checkpoints" / "pretrain-r0001.safetensors"
    try:
        assert fl.run_and_kill(2, config, first.exists), "the server was not killed mid-run"
        before = {name: ledger.path.read_text() for name, ledger in ledgers.items()}
        resumed = fl.run(2, config | {"resume": True})
    finally:
        fl.stop()
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0 and "resuming after pretrain round" in output, output[-3000:]
    assert "max (patient level)" in output  # the console's round line shows the largest site epsilon
    summary = (runs / "dp" / "federation" / "summary.md").read_text()
    assert "| epsilon max (patient) |" in summary.splitlines()[0]
    db = sqlite3.connect(runs / "dp" / "federation" / "store.sqlite")
    assert db.execute("SELECT status FROM runs").fetchall() == [("completed",)]
    db.close()

    train = replies(runs / "dp")
    for name, ledger in ledgers.items():
        after = ledger.path.read_text()
        assert after.startswith(before[name]), f"{name}'s ledger lost entries"  # append-only
        releases = [e for e in ledger.entries() if e["kind"] == "release"]
        accountant = RDPAccountant()
        accountant.history = [tuple(m) for e in releases for m in e["mechanisms"]]
        whole = accountant.get_epsilon(delta=1e-5)
        reported = [m["privacy-epsilon"] for _, _, site, _, _, m in train if site == name]
        assert reported[-1] == pytest.approx(whole, rel=1e-9), name  # a number in every reply
        assert reported == sorted(reported), name  # never rolled back, across the restart too
    # the ample site trained every round it was asked, including those re-run after the resume
    ukb = [(phase, rnd, ok) for phase, rnd, site, ok, _, _ in train if site == "ukb"]
    assert all(ok for *_, ok in ukb) and [r for p, r, _ in ukb if p == "pretrain"][-3:] == [1, 2, 3][-3:]
    released = [
        e["round"] for e in ledgers["ukb"].entries() if e["kind"] == "release" and e["phase"] == "pretrain"
    ]
    assert len(released) >= 3 and released[-2:] == [2, 3]
    # the tight site trained round 1, then refused with its reason while the run went on
    aptos = [(phase, rnd, ok, reason) for phase, rnd, site, ok, reason, _ in train if site == "aptos"]
    assert aptos[0][:3] == ("pretrain", 1, 1)
    refused = [a for a in aptos if not a[2]]
    assert refused and all("refused by the site: privacy budget exhausted" in a[3] for a in refused)
    assert ("pretrain", 3, 0) in [a[:3] for a in aptos]
    kinds = [e["kind"] for e in ledgers["aptos"].entries()]
    assert "refused" in kinds and kinds.count("release") == sum(1 for a in aptos if a[2])
