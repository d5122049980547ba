"""A national screening programme's federation: 100 virtual sites through the real `flwr run .` (local
SuperLink, Ray actors), a seeded tenth of them training each round. Tiny profile, one patient (two images)
per site, pretraining rounds of one local step: the test is about the orchestration, not the learning."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, write_site
from tests.integration.flower import Flower, assert_completed, sets, store_rows

pytestmark = pytest.mark.integration

SITES, ROUNDS = 100, 3


@pytest.fixture(scope="module")
def flower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    fl = Flower(tmp_path_factory.mktemp("flwr-home"), ROOT)
    yield fl
    fl.stop()


def test_a_hundred_sites_train_a_seeded_tenth_each_round(flower: Flower, tmp_path: Path) -> None:
    source = write_site(tmp_path, "eyepacs", SITES, height=64)  # one patient, two eyes, per site
    plan = tmp_path / "hundred.yaml"
    plan.write_text(
        yaml.safe_dump({"name": "hundred", "split": {"kind": "iid", "source": str(source), "parts": SITES}})
    )
    runs = tmp_path / "runs"
    result = flower.run(
        SITES,
        {
            "profile": "tiny",
            "scenario": str(plan),
            "run-name": "hundred",
            "set": sets(
                runs_dir=runs,
                federation__rounds_pretrain=ROUNDS,
                federation__rounds_finetune=0,
                federation__participation=0.1,
                federation__min_sites=5,
                federation__local_steps=1,
                pretrain__batch_size=2,
            ),
        },
        timeout=900,
    )
    run = runs / "hundred"
    assert_completed(result, run, flower.home)
    rounds = store_rows(run, "SELECT round, sampled, accepted, status FROM rounds ORDER BY round")
    replies = store_rows(run, "SELECT round, site FROM replies WHERE kind = 'train' AND accepted = 1")
    rss = store_rows(run, "SELECT COUNT(*) FROM metrics WHERE source = 'server' AND key = 'peak-rss-mb'")
    assert rounds == [(r, 10, 10, "ok") for r in range(1, ROUNDS + 1)]
    trained = {r: {site for rnd, site in replies if rnd == r} for r in range(1, ROUNDS + 1)}
    names = {f"eyepacs-iid{k}" for k in range(SITES)}
    assert all(len(sites) == 10 and sites <= names for sites in trained.values())
    assert len(set.union(*trained.values())) > 10  # the sample is redrawn each round
    assert rss == [(ROUNDS,)]
