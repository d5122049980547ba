"""Run stores for the dashboard tests, written by the ServerApp's own writers (`RunStore`, `Recorder`), with
the fates a real run records: accepted, rejected with a validation reason, refused by a site's privacy
budget, failed with an error reply, timed out."""

from __future__ import annotations

import json
from pathlib import Path

from server.directory import SiteInfo
from server.recorder import Recorder
from server.store import RunStore
from shared.config import load_config
from shared.federation.aggregation import Verdict

REJECTED = "holds NaN or Inf in encoder.features.0.weight"
REFUSED = (
    "refused by the site: privacy budget exhausted: epsilon 3.971 spent, this round would reach 5.530 > 4.5"
)


def site(i: int) -> SiteInfo:
    return SiteInfo(
        node_id=1000 + i, name=f"site-{i:02d}", partition=i, images=100 + i, labelled={}, classes={}
    )


def start(runs: Path, name: str, sites: int, rounds: int, scenario: str = "iid-4") -> RunStore:
    """A private run of `rounds` pretraining rounds over `sites` sites, started but with no round yet."""
    cfg = load_config(
        profile="tiny",
        overrides={
            "name": name,
            "federation.rounds_pretrain": rounds,
            "federation.rounds_finetune": 0,
            "privacy.enabled": True,
            "model.norm": "gn",
            "pretrain.loss_reduction": "sample",
        },
    )
    store = RunStore(runs / name / "federation" / "store.sqlite", name)
    store.start_run("uid-" + name, 7, scenario, "fedavg", json.loads(cfg.model_dump_json()))
    for i in range(sites):
        s = site(i)
        store.add_site(s.node_id, s.name, s.partition, s.images, [])
    store.event("start", "Flower run 7")
    return store


def record_round(store: RunStore, rnd: int, sites: int, pace: float = 1.0) -> None:
    """One pretraining round: site 1 rejected, site 2 refused (its budget), site 3 failed on even rounds,
    the others accepted, each with its own loss, seconds, bytes, norm, cosine and epsilon (`pace` sets how
    fast the losses fall, so that compared runs differ)."""
    recorder = Recorder(store, "pretrain")
    recorder.round_started(rnd, sites)
    accepted = 0
    for i in range(sites):
        s = site(i)
        metrics = {
            "num-examples": s.images,
            "train-loss": 1.0 / (pace * rnd + i),
            "steps": 2,
            "duration-s": 0.4 if i == 0 else 10.0 + i + (30.0 if i == 4 else 0.0),  # site 4 straggles
            "privacy-epsilon": 0.5 * rnd + 0.1 * i,
        }
        if i == 3 and rnd % 2 == 0:
            recorder.failed(rnd, "train", s, "error reply NODE_UNAVAILABLE (5): node went away", 5)
            continue
        reason = REJECTED if i == 1 else REFUSED if i == 2 else None
        accepted += reason is None
        recorder.trained(
            rnd,
            s,
            metrics=metrics,
            nbytes=1_000_000 + i,
            verdict=Verdict(reason, 0.5 + 0.01 * i if reason != REFUSED else None),
            cosine=0.9 - 0.01 * i if reason is None else None,
            aggregated=reason is None,
        )
    recorder.finished(
        rnd, sites, accepted, {"train-loss": 1.0 / rnd, "privacy-epsilon-max": 0.5 * rnd + 0.1 * sites}
    )
    recorder.metrics(rnd, "server-probe", {"probe-loss": 1.0 - 0.01 * pace * rnd})


def record_final_test(
    store: RunStore, rnd: int, scores: dict[int, tuple[int, float]], kind: str = "test"
) -> None:
    """The final test's replies: site i scored the final model (or, `kind` "cross:<site>", that site's own
    model) on `images` test images of DR with referable AUC `auc` (the other metrics derived from it)."""
    recorder = Recorder(store, "finetune")
    for i, (images, auc) in scores.items():
        metrics = {"dr-num-examples": images, "dr-referable_auc": auc, "dr-auc": auc - 0.1}
        metrics["dr-kappa"] = auc / 2
        recorder.evaluated(rnd, site(i), metrics, images, kind=kind)
