"""A hostile site against the server: updates that are NaN, oversized, shape-shifted, of another dtype,
with extra or missing tensors or a forged weight, and replies replayed or answering another round. Each
is refused with its reason (the server's own validation, `shared/federation/aggregation.py:check_update`, and
its reply matching, `server/strategy.py`), and the honest sites' average is what it would be without it.
(A stolen or unregistered key, and bodies beyond the bound, are the deployment tests': real processes.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from server.directory import SiteInfo
from server.recorder import Recorder
from server.store import RunStore, StoreReader
from server.strategy import FedRetina
from shared.config import load_config
from shared.federation.aggregation import average, check_update, site_update
from shared.federation.wire import FINETUNE, METRICS, PRETRAIN, RunSpec
from tests.conftest import UID

pytestmark = pytest.mark.security
REFERENCE = {
    "encoder.w": np.ones((4, 3), np.float32),
    "encoder.bn.num_batches_tracked": np.array(3, np.int64),
}


def honest(scale: float = 1.0) -> dict[str, np.ndarray]:
    return {"encoder.w": REFERENCE["encoder.w"] * scale, "encoder.bn.num_batches_tracked": np.array(5)}


HOSTILE: dict[str, tuple[dict[str, np.ndarray], object, str]] = {
    "NaN": ({**honest(), "encoder.w": np.full((4, 3), np.nan, np.float32)}, 10, "holds NaN or Inf"),
    "Inf": ({**honest(), "encoder.w": np.full((4, 3), np.inf, np.float32)}, 10, "holds NaN or Inf"),
    "huge": (honest(1e9), 10, "exceeds the bound"),
    "shape-shifted": ({**honest(), "encoder.w": np.ones((3, 4), np.float32)}, 10, "shape (3, 4) instead of"),
    "float64": ({**honest(), "encoder.w": np.ones((4, 3))}, 10, "dtype float64 instead of float32"),
    "extra tensor": ({**honest(), "encoder.backdoor": np.ones(1, np.float32)}, 10, "unexpected keys"),
    "missing tensor": ({"encoder.bn.num_batches_tracked": np.array(5)}, 10, "missing keys"),
    "weight of a billion": (honest(), 10**9, "not a positive whole count"),
    "weight zero": (honest(), 0, "not a positive whole count"),
    "weight NaN": (honest(), float("nan"), "not a positive whole count"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_update_is_refused_with_its_reason(case: str) -> None:
    arrays, examples, reason = HOSTILE[case]
    verdict = check_update(arrays, REFERENCE, required=list(REFERENCE), max_norm=1e4, examples=examples)
    assert verdict.reason is not None and reason in verdict.reason, verdict


def test_the_honest_average_is_untouched_by_a_refused_site() -> None:
    honest_sites = [site_update(f"s{i}", honest(1 + i), {"num-examples": 10}, {}) for i in range(2)]
    alone = average(honest_sites, REFERENCE)
    verdict = check_update(HOSTILE["huge"][0], REFERENCE, required=list(REFERENCE), max_norm=1e4, examples=10)
    assert verdict.reason  # refused, so never in the list the server averages
    assert np.allclose(alone["encoder.w"], REFERENCE["encoder.w"] * 1.5)


def test_a_replayed_reply_or_one_to_another_round_counts_for_nothing(tmp_path: Path) -> None:
    """The server pairs a reply with the message it answers: a second copy of a site's reply, and a reply to
    a message of another round, are ignored; the site counts once, and a site that sent only stale replies
    is recorded as timed out."""
    cfg = load_config(profile="tiny")
    store = RunStore(tmp_path / "store.sqlite", "r")
    store.start_run(UID, 1, "", "fedavg", {})
    strategy = FedRetina(RunSpec(cfg, UID, ""), PRETRAIN, {}, None, Recorder(store, PRETRAIN))  # type: ignore[arg-type]
    a, b = (SiteInfo(node_id=n, name=f"s{n}", partition=0, images=1, labelled={}, classes={}) for n in (1, 2))
    sent = [
        Message(
            RecordDict({}), metadata=Metadata(1, f"m{i}", 0, s.node_id, "", "", 0.0, 60.0, "train.pretrain")
        )
        for i, s in enumerate((a, b))
    ]
    strategy.outbox, strategy.sent = list(zip(sent, (a, b), strict=True)), [a, b]

    def reply(to: str, node: int) -> Message:
        meta = Metadata(1, f"r-{to}-{node}", node, 0, to, "", 0.0, 60.0, "train.pretrain")
        return Message(RecordDict({"metrics": ConfigRecord({})}), metadata=meta)

    replies = [reply("m0", 1), reply("m0", 1), reply("m-older-round", 2)]
    matched = [site.name for _, site in strategy._match(replies, 1, "train")]
    assert matched == ["s1"]
    fates = [(r["site"], r["reason"]) for r in StoreReader(store.path).replies()]
    assert fates == [("s2", f"timed out: no reply within {cfg.federation.reply_timeout_s:g} s")]


SCORES: dict[str, tuple[dict[str, float], str]] = {
    "count NaN": ({"dr-num-examples": float("nan"), "dr-auc": 0.9}, "dr-num-examples is nan"),
    "count of a billion": ({"dr-num-examples": 10**9, "dr-auc": 0.9}, "dr-num-examples is 1000000000"),
    "count fractional": ({"dr-num-examples": 2.5, "dr-auc": 0.9}, "dr-num-examples is 2.5"),
    "score infinite": ({"dr-num-examples": 10, "dr-auc": float("inf")}, "dr-auc is inf, not a finite score"),
}


@pytest.mark.parametrize("kind", ["evaluate", "test"])
def test_malformed_evaluation_scores_are_recorded_as_failed_and_left_out(tmp_path: Path, kind: str) -> None:
    """Validation and final-test replies carry counts and scores the server averages and shows: a site
    sending a count that is no whole number of images, or an infinite score, is recorded as failed with
    why (never a crash of the server, never in the average or the final test table); the honest site's
    scores are what is kept."""
    cfg = load_config(profile="tiny")
    store = RunStore(tmp_path / "store.sqlite", "r")
    store.start_run(UID, 1, "", "fedavg", {})
    strategy = FedRetina(RunSpec(cfg, UID, ""), FINETUNE, {"dr": 5}, None, Recorder(store, FINETUNE))  # type: ignore[arg-type]
    sites = [
        SiteInfo(node_id=n, name=f"s{n}", partition=0, images=1, labelled={"dr": 5}, classes={})
        for n in range(1, len(SCORES) + 2)
    ]
    action = "finetune" if kind == "evaluate" else kind
    sent = [
        Message(
            RecordDict({}),
            metadata=Metadata(1, f"m{s.node_id}", 0, s.node_id, "", "", 0.0, 60.0, f"evaluate.{action}"),
        )
        for s in sites
    ]
    strategy.outbox, strategy.sent = list(zip(sent, sites, strict=True)), sites
    honest = {"dr-num-examples": 10, "dr-auc": 0.8}

    def reply(site: SiteInfo, metrics: dict[str, float]) -> Message:
        meta = Metadata(
            1, f"r{site.node_id}", site.node_id, 0, f"m{site.node_id}", "", 0.0, 60.0, f"evaluate.{action}"
        )
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), metadata=meta)

    replies = [reply(sites[0], honest)] + [
        reply(s, m) for s, (m, _) in zip(sites[1:], SCORES.values(), strict=True)
    ]
    if kind == "evaluate":
        merged = strategy.aggregate_evaluate(1, replies)
        assert merged is not None and merged["dr-auc"] == pytest.approx(0.8)
    else:
        strategy.aggregate_test(1, replies)
    recorded = {r["site"]: r for r in StoreReader(store.path).replies(kind=kind)}
    assert recorded["s1"]["accepted"] and recorded["s1"]["metrics"]["dr-auc"] == pytest.approx(0.8)
    for site, (_, why) in zip(sites[1:], SCORES.values(), strict=True):
        row = recorded[site.name]
        assert (
            not row["accepted"] and why in row["reason"] and "malformed evaluation metrics" in row["reason"]
        )
