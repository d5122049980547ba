"""Secure aggregation (SecAgg+) through the real `flwr run .`, tiny profile, three virtual sites.

- all three sites: a fine-tuning round's model equals plain FedAvg's (the replay of the same sites from the
  run store) within SecAgg+'s quantisation, the server recorded no per-site norm or cosine, and the
  dashboard (in a real browser) shows them as hidden;
- sites dropping out after the key exchange: with two of three left the sum is unmasked without the third
  and equals FedAvg over the two; with one left the protocol halts, the round is recorded as halted and the
  model kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from server.strategy import DROPPED, HALTED
from shared.federation.securesum import QUANTIZATION_LEVELS
from simulation.replay import replay
from tests.conftest import ROOT
from tests.integration.flower import Flower, app_with_client, iid_scenario, sets, store_rows
from tests.integration.web import dashboard, screenshot

pytestmark = pytest.mark.integration
CLIP = 8.0  # federation.secagg_clipping_range's default


@pytest.fixture(scope="module")
def flower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    fl = Flower(tmp_path_factory.mktemp("flwr-home-secagg"), ROOT)
    yield fl
    fl.stop()


def secure_run(fl: Flower, plan: Path, runs: Path, name: str, pretrain: int) -> Path:
    settings = sets(
        runs_dir=runs,
        threads=1,  # the replay computes the same floats only with the same thread count
        federation__secure_aggregation="true",
        federation__min_sites=1,
        federation__rounds_pretrain=pretrain,
        federation__rounds_finetune=1,
    )
    result = fl.run(3, {"profile": "tiny", "scenario": str(plan), "run-name": name, "set": settings})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return runs / name


def assert_fedavg_within_quantisation(run: Path, phase: str, summed: str | None = None) -> None:
    """The run's final model of `phase` against the plain average of the sites the store marks as
    aggregated: every float entry within the resolution of the sum in phase `summed` (its last round's
    SecAgg+ sum, divided by the summed weight: examples / the largest site's images)."""
    replayed, final = replay(run / "federation")[phase]
    largest = max(images for (images,) in store_rows(run, "SELECT images FROM sites"))
    sql = "SELECT num_examples FROM replies WHERE phase = '{}' AND kind = 'train' AND aggregated"
    examples = store_rows(run, sql.format(summed or phase))
    weight = sum(n for (n,) in examples) / largest
    bound = len(examples) * (2 * CLIP / QUANTIZATION_LEVELS) / weight * 1.5 + 1e-6
    floats = [k for k, v in final.items() if np.issubdtype(v.dtype, np.floating)]
    worst = max(float(np.abs(final[k].astype(np.float64) - replayed[k]).max()) for k in floats)
    assert worst <= bound, (worst, bound)
    assert all(np.array_equal(final[k], replayed[k]) for k in final if k not in floats)


def test_three_sites_sum_securely_to_what_fedavg_averages(
    flower: Flower, tiny_sites: dict[str, Path], tmp_path: Path, browser: object
) -> None:
    run = secure_run(flower, iid_scenario(tmp_path, tiny_sites["aptos"], 3), tmp_path / "runs", "secure", 0)
    rows = store_rows(run, "SELECT phase, accepted, status FROM rounds")
    assert rows == [("finetune", 3, "ok")]
    replies = store_rows(
        run, "SELECT accepted, aggregated, update_norm, cosine, metrics FROM replies WHERE kind = 'train'"
    )
    assert len(replies) == 3
    assert all(r[:4] == (1, 1, None, None) for r in replies)  # accepted, averaged, their norms hidden
    assert {json.loads(r[4])["secagg-refusal"] for r in replies} == {0}
    assert_fedavg_within_quantisation(run, "finetune")
    with dashboard(tmp_path / "runs") as base:  # the dashboard says what the server cannot see
        page = browser.new_page()  # type: ignore[attr-defined]
        page.goto(base + "/run/secure")
        assert "secure aggregation (SecAgg+)" in page.inner_text("p.meta")
        assert "update norm per site, cosine to the aggregate (drift): hidden" in page.inner_text("#hidden")
        assert page.locator("#chart-norm-finetune").count() == 0
        assert page.locator("#chart-site-loss-finetune").count() == 1
        screenshot(page, "secure")


def test_a_site_dropping_out_is_unmasked_without_and_two_halt_the_round(
    tiny_sites: dict[str, Path], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    fl = Flower(tmp_path_factory.mktemp("flwr-home-dropout"), app_with_client(tmp_path, "dropout_client"))
    try:
        run = secure_run(fl, iid_scenario(tmp_path, tiny_sites["aptos"], 3), tmp_path / "runs", "dropout", 1)
    finally:
        fl.stop()
    rounds = dict(store_rows(run, "SELECT phase, status FROM rounds"))
    assert rounds["pretrain"] == "ok" and rounds["finetune"].startswith("halted")
    fates = store_rows(
        run, "SELECT phase, site, aggregated, reason FROM replies WHERE kind = 'train' ORDER BY phase, site"
    )
    by = {(phase, site): (aggregated, reason) for phase, site, aggregated, reason in fates}
    assert by[("pretrain", "aptos-iid0")] == by[("pretrain", "aptos-iid1")] == (1, "")
    assert by[("pretrain", "aptos-iid2")] == (0, DROPPED)
    assert {by[("finetune", f"aptos-iid{i}")] for i in range(3)} == {(0, HALTED)}
    assert any("halted" in m for (m,) in store_rows(run, "SELECT message FROM events"))
    assert_fedavg_within_quantisation(run, "pretrain")  # the two that stayed, averaged
    # halted: the starting model kept, from the encoder the pretraining sum gave
    assert_fedavg_within_quantisation(run, "finetune", summed="pretrain")
