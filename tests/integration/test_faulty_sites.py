"""Simulated federations with sites that misbehave on purpose (real `flwr run .`, clientapps that corrupt
their replies): faulty updates rejected with their reasons, cyclic weight transfer passing over the faulty,
and the trimmed mean keeping a valid outlier out. Each run's store replays exactly where it should."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from server.checkpoints import Checkpoints
from server.run import initial_weights
from shared.config import load_config
from shared.federation.aggregation import update_norm
from shared.weights import load_weights
from tests.conftest import write_site
from tests.integration.flower import (
    REPLAYED,
    Flower,
    app_with_client,
    assert_replays_exactly,
    faulty_run,
    iid_scenario,
    sets,
    store_rows,
)

pytestmark = pytest.mark.integration


def test_faulty_sites_are_rejected_with_their_reasons_and_the_run_completes(
    tiny_sites: dict[str, Path], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    plan = iid_scenario(tmp_path, tiny_sites["aptos"], 4)
    result = faulty_run(tmp_path, tmp_path_factory, plan, "faulty", **REPLAYED)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "runs" / "faulty"
    assert store_rows(run, "SELECT status FROM runs") == [("completed",)]
    rows = store_rows(
        run, "SELECT phase, site, accepted, reason FROM replies WHERE kind = 'train' ORDER BY site"
    )
    by_phase = {
        phase: {site: (accepted, reason) for p, site, accepted, reason in rows if p == phase}
        for phase in ("pretrain", "finetune")
    }
    for by_site in by_phase.values():
        assert by_site["aptos-iid0"] == (1, "")
        assert by_site["aptos-iid1"][0] == 0 and "holds NaN or Inf" in by_site["aptos-iid1"][1]
        assert by_site["aptos-iid2"][0] == 0 and "shape" in by_site["aptos-iid2"][1]
        assert by_site["aptos-iid3"][0] == 0
    assert "exceeds the bound" in by_phase["pretrain"]["aptos-iid3"][1]
    # failed inside its handler: the server learns the error's class, not the patient's path
    assert "ConfigError at this site" in by_phase["finetune"]["aptos-iid3"][1]
    server_side = store_rows(run, "SELECT reason FROM replies") + store_rows(
        run, "SELECT message FROM events"
    )
    assert not any("Jane-Doe" in text for (text,) in server_side)
    assert store_rows(run, "SELECT accepted, status FROM rounds") == [(1, "ok"), (1, "ok")]
    model, _ = load_weights(run / "federation" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())
    assert_replays_exactly(run)


@pytest.mark.parametrize("carry", [False, True], ids=["own-moments", "carried-moments"])
def test_cyclic_weight_transfer_chains_the_honest_sites_and_passes_over_the_faulty(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, carry: bool
) -> None:
    """Five sites train one after another (partitions 0 and 4 honest, 1-3 faulty): the faulty ones are
    rejected and passed over, and the replay, which trains the two honest sites in turn in each round's
    `cycle_order`, the second from the first's model, gives the run's weights bit for bit. With
    `carry_optimizer` the optimiser moments follow the model, from site to site and from round to round
    (two fine-tuning rounds); partition 1's NaN is then in the moments it hands on, and refused."""
    source = write_site(tmp_path, "aptos", 25, seed=5)
    plan = iid_scenario(tmp_path, source, 5)
    settings: dict[str, object] = {**REPLAYED, "federation__strategy": "cyclic"}
    if carry:  # the sites keep no moments of their own: those they start from are all the chain's
        settings |= {
            "federation__carry_optimizer": True,
            "federation__rounds_finetune": 2,
            "federation__keep_optimizer_state": False,
        }
    result = faulty_run(tmp_path, tmp_path_factory, plan, "cyclic", **settings)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "runs" / "cyclic"
    aggregated = store_rows(run, "SELECT DISTINCT site FROM replies WHERE aggregated = 1 ORDER BY site")
    assert aggregated == [("aptos-iid0",), ("aptos-iid4",)]
    rounds = 3 if carry else 2
    rejected = store_rows(run, "SELECT count(*) FROM replies WHERE kind = 'train' AND NOT accepted")
    assert rejected == [(3 * rounds,)]  # three faulty sites in each round
    assert store_rows(run, "SELECT sampled, accepted, status FROM rounds") == [(5, 2, "ok")] * rounds
    reasons = store_rows(
        run, "SELECT DISTINCT reason FROM replies WHERE site = 'aptos-iid1' AND kind = 'train'"
    )
    expected = "optimiser moments" if carry else "holds NaN or Inf"
    assert len(reasons) == 1 and expected in reasons[0][0], reasons
    assert_replays_exactly(run)


def test_the_trimmed_mean_keeps_a_valid_outlier_out_of_the_model_in_a_real_run(
    tiny_sites: dict[str, Path], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Three simulated sites, the third sending its change flipped and fifty times as large (finite, in
    bounds: accepted and aggregated). The trimmed mean (one value dropped at each end) keeps the round's
    change within what the honest sites' changes allow, coordinate by coordinate: its norm is at most the
    root of the honest norms' squares, where FedAvg would move about 16 times an honest site's way."""
    plan = iid_scenario(tmp_path, tiny_sites["aptos"], 3)
    nodes = 3
    fl = Flower(tmp_path_factory.mktemp("flwr-home-robust"), app_with_client(tmp_path, "outlier_client"))
    settings = {"federation__strategy": "trimmed-mean", "federation__trim_fraction": 0.34}
    settings |= {"federation__rounds_pretrain": 1, "federation__rounds_finetune": 0, "threads": 1}
    settings |= {"federation__max_update_norm": 1e6}  # the bound a careless operator set loose
    config = {"profile": "tiny", "scenario": str(plan), "run-name": "robust"}
    try:
        result = fl.run(nodes, config | {"set": sets(runs_dir=tmp_path / "runs", **settings)})
    finally:
        fl.stop()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "runs" / "robust"
    replies = store_rows(run, "SELECT site, accepted, aggregated, update_norm FROM replies ORDER BY site")
    assert [(s, a, g) for s, a, g, _ in replies] == [(f"aptos-iid{i}", 1, 1) for i in range(3)]  # all valid
    honest, attacker = [n for *_, n in replies[:2]], replies[2][3]
    assert attacker > 10 * max(honest)  # the lie is large, and passed every check
    cfg = load_config(profile="tiny", overrides={"federation.strategy": "trimmed-mean"})
    start = initial_weights(cfg, "pretrain", {}, None)
    final = Checkpoints(run / "federation" / "checkpoints").load("pretrain", 1).arrays
    moved = update_norm(final, start)
    assert moved <= float(np.sqrt(sum(n * n for n in honest))) + 1e-6, (moved, honest, attacker)
