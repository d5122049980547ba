"""MimeLite in a real `flwr run .`: the server's optimiser moments go out with the model, every site steps
with them, and the moments the server averages from the replies carry on from round to round."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.checkpoints import Checkpoints
from tests.conftest import ROOT
from tests.integration.flower import Flower, iid_scenario, sets, store_rows

pytestmark = pytest.mark.integration


def test_the_servers_moments_travel_and_accumulate_over_rounds(
    tiny_sites: dict[str, Path], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two IID sites, two rounds of each phase. Each site returns the state its K local steps make of
    the server's, so after round 2 the server's step count is twice round 1's (a site that restarted
    from its own or a fresh state would send K again), its second moments are positive where it
    trained, and a reply costs the weights plus two moments (about 3x FedAvg's bytes)."""
    plan = iid_scenario(tmp_path, tiny_sites["aptos"], 2)
    fl = Flower(tmp_path_factory.mktemp("flwr-home-mime"), ROOT)
    settings = {"federation__strategy": "mime", "federation__rounds_pretrain": 2}
    settings |= {"federation__rounds_finetune": 2, "federation__min_sites": 2}
    config = {"profile": "tiny", "scenario": str(plan), "run-name": "mime"}
    try:
        result = fl.run(2, config | {"set": sets(runs_dir=tmp_path / "runs", **settings)})
    finally:
        fl.stop()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "runs" / "mime"
    assert store_rows(run, "SELECT DISTINCT accepted, aggregated FROM replies WHERE kind = 'train'") == [
        (1, 1)
    ]
    saved = Checkpoints(run / "federation" / "checkpoints")
    for phase in ("pretrain", "finetune"):
        first, second = saved.load(phase, 1), saved.load(phase, 2)
        steps = {k: float(v) for k, v in first.carried.items() if k.endswith("/step")}
        trained = [k for k, v in steps.items() if v > 0]
        assert trained, phase
        assert all(float(second.carried[k]) == 2 * steps[k] for k in trained), phase
        squares = [second.carried[k.replace("/step", "/exp_avg_sq")] for k in trained]
        assert all((v >= 0).all() for v in squares) and any((v > 0).any() for v in squares)
        model_bytes = sum(v.nbytes for v in second.arrays.values())
        sent = store_rows(
            run, f"SELECT bytes FROM replies WHERE kind = 'train' AND phase = '{phase}' AND round = 2"
        )
        assert all(2.5 * model_bytes < b < 3.5 * model_bytes for (b,) in sent), (sent, model_bytes)
