"""The server's own per-parameter state in a real `flwr run .`: MimeLite's optimiser moments and SCAFFOLD's
control variates go out with the model, every site steps with them, and what the server averages from the
replies carries on from round to round."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.checkpoints import Checkpoints
from shared.weights import load_weights
from tests.conftest import ROOT
from tests.integration.flower import Flower, assert_completed, iid_scenario, sets, store_rows

pytestmark = pytest.mark.integration


def _two_sites_two_rounds(
    strategy: str, tiny_sites: dict[str, Path], tmp_path: Path, factory: pytest.TempPathFactory
) -> Path:
    """A completed tiny run of `strategy`: the APTOS-like site split IID in two, two rounds of each phase;
    its run folder (`tmp_path/runs/<strategy>`)."""
    plan = iid_scenario(tmp_path, tiny_sites["aptos"], 2)
    fl = Flower(factory.mktemp(f"flwr-home-{strategy}"), ROOT)
    settings = {"federation__strategy": strategy, "federation__rounds_pretrain": 2}
    settings |= {"federation__rounds_finetune": 2, "federation__min_sites": 2}
    config = {"profile": "tiny", "scenario": str(plan), "run-name": strategy}
    try:
        result = fl.run(2, config | {"set": sets(runs_dir=tmp_path / "runs", **settings)})
    finally:
        fl.stop()
    run = tmp_path / "runs" / strategy
    assert_completed(result, run, fl.home)
    return run


def test_the_servers_moments_travel_and_accumulate_over_rounds(
    tiny_sites: dict[str, Path], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two IID sites, two rounds of each phase. Each site returns the state its K local steps make of
    the server's, so after round 2 the server's step count is twice round 1's (a site that restarted
    from its own or a fresh state would send K again), its second moments are positive where it
    trained, and a reply costs the weights plus two moments (about 3x FedAvg's bytes)."""
    run = _two_sites_two_rounds("mime", tiny_sites, tmp_path, tmp_path_factory)
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


def test_the_servers_control_variate_is_the_average_of_the_ones_its_sites_keep(
    tiny_sites: dict[str, Path], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SCAFFOLD with two IID sites, two rounds of each phase: each site keeps its own control variates in
    its state folder, the server's after round 2 are the example-weighted average of the two sites' (the
    replies carry exactly what the sites keep), and a reply costs the weights plus one variate (2x)."""
    run = _two_sites_two_rounds("scaffold", tiny_sites, tmp_path, tmp_path_factory)
    (uid,) = store_rows(run, "SELECT run_uid FROM runs")[0]
    saved = Checkpoints(run / "federation" / "checkpoints")
    for phase in ("pretrain", "finetune"):
        server = saved.load(phase, 2)
        assert server.carried and all(k.endswith("/control") for k in server.carried), phase
        examples = dict(
            store_rows(
                run,
                f"SELECT site, num_examples FROM replies WHERE kind = 'train' AND phase = '{phase}' "
                "AND round = 2 AND aggregated = 1",
            )
        )
        kept = {
            path.parent.parent.name: load_weights(path)[0]
            for path in tiny_sites["aptos"].parent.rglob(f"{uid}/{phase}-control-r0002.safetensors")
        }
        assert sorted(kept) == sorted(examples), (kept.keys(), examples)
        trained = set.intersection(*(set(c) for c in kept.values()))
        assert trained and any(server.carried[k].any() for k in trained), phase
        total = sum(examples.values())
        for key in trained:
            average = sum(examples[s] * kept[s][key].double().numpy() for s in kept) / total
            assert np.allclose(server.carried[key], average, atol=1e-6), (phase, key)
        model_bytes = sum(v.nbytes for v in server.arrays.values())
        sent = store_rows(
            run, f"SELECT bytes FROM replies WHERE kind = 'train' AND phase = '{phase}' AND round = 2"
        )
        assert all(1.5 * model_bytes < b < 2.5 * model_bytes for (b,) in sent), (sent, model_bytes)
