"""One phase of the federation as a Flower Message-API strategy.

Flower's own `Strategy.start` runs the rounds; this class fills in its four hooks:
- configure_train: wait for enough eligible sites (our deadline), send `train.<phase>` with the round spec;
- aggregate_train: validate every reply (keys, shapes, dtypes, NaN/Inf, update norm), record accepted and
  rejected replies with their reasons, then aggregate with `shared.aggregation` (sorted by site, float64,
  per-key holders, so task heads only average among their sites), FedAdam on top when asked. A round with
  fewer accepted sites than `min_sites` keeps the previous model and is recorded as skipped;
- configure/aggregate_evaluate (phase 2): federated evaluation on each site's validation images;
- `end_of_round` (Flower's evaluate_fn, called after each round): probe evaluation and the checkpoint.

Strategies: fedavg, fedprox (clients add mu/2 ||w - w_global||^2), fedbn (sites keep their BatchNorm; the
server's BN entries are averages used only for probes and exports), fedadam (server Adam on the average).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.checkpoints import Checkpoints
from server.sites import SiteDirectory, SiteInfo
from server.store import Reply, RunStore
from shared.aggregation import (
    Arrays,
    FedAdamState,
    Update,
    Verdict,
    average,
    buffer_keys,
    check_update,
    cosine,
    fedadam,
)
from shared.config import ExperimentConfig

log = logging.getLogger(__name__)


@dataclass
class PhasePlan:
    phase: str  # "pretrain" or "finetune"
    offset: int  # rounds already done (resume)
    total: int  # rounds in this phase
    tasks: dict[str, int]  # phase 2: task -> classes (one head each)
    run_name: str
    run_uid: str  # this run's identity, kept across resumes: sites file their state under it
    identity: dict  # what a checkpoint must match to be resumed (see server/run.py:run_identity)


class FedRetina(Strategy):
    def __init__(
        self,
        cfg: ExperimentConfig,
        plan: PhasePlan,
        directory: SiteDirectory,
        store: RunStore,
        checkpoints: Checkpoints,
        probe: Callable[[int, Arrays], dict[str, float]] | None = None,
        adam: FedAdamState | None = None,
    ) -> None:
        self.cfg, self.plan, self.directory, self.store = cfg, plan, directory, store
        self.checkpoints, self.probe, self.adam = checkpoints, probe, adam
        self.reference: Arrays = {}
        self.sent: list[SiteInfo] = []

    # ------------------------------------------------------------------ training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self.plan.offset + server_round
        self.sent = self.directory.wait(grid, self._eligible)
        self.reference = {k: v.numpy() for k, v in arrays.items()}
        self.store.round_started(self.plan.phase, rnd, len(self.sent))
        log.info(
            "[%s round %d/%d] training on %s",
            self.plan.phase,
            rnd,
            self.plan.total,
            ", ".join(s.name for s in self.sent),
        )
        return self._messages(arrays, rnd, "train")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self.plan.offset + server_round
        candidates: list[Candidate] = []
        for msg, site in self._match(replies, rnd, "train"):
            arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
            metrics = dict(msg.content["metrics"])
            verdict = check_update(
                arrays,
                self.reference,
                required=self._required(site),
                max_norm=self.cfg.federation.max_update_norm,
                examples=metrics.get("num-examples"),
            )
            candidates.append(Candidate(site, arrays, metrics, msg.content["arrays"].count_bytes(), verdict))
        accepted = [c.update(self.plan.tasks) for c in candidates if c.verdict.reason is None]
        if len(accepted) < self.directory.min_sites:
            status = f"skipped: {len(accepted)} accepted update(s), {self.directory.min_sites} needed"
            self._record(candidates, rnd, None)
            self.store.round_finished(self.plan.phase, rnd, len(candidates), len(accepted), status)
            self.store.event(
                "round-skipped", f"{self.plan.phase} round {rnd} {status}; model unchanged", "warning"
            )
            log.warning("%s round %d %s; the model is unchanged", self.plan.phase, rnd, status)
            return None, None
        new = average(accepted, self.reference)
        if self.cfg.federation.strategy == "fedadam":
            new, self.adam = fedadam(
                self.reference,
                new,
                self.adam,
                lr=self.cfg.federation.server_lr,
                buffers=buffer_keys(self.reference),
            )
        self._record(candidates, rnd, new)
        merged = _weighted(c.metrics for c in candidates if c.verdict.reason is None)
        self.store.add_metrics(self.plan.phase, rnd, "train", merged)
        self.store.round_finished(self.plan.phase, rnd, len(candidates), len(accepted), "ok")
        return to_record(new), MetricRecord(merged)

    # ---------------------------------------------------------------- evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.plan.phase != "finetune":
            self.sent = []  # no federated evaluation in pretraining (the server probes instead)
            return []
        self.sent = self.directory.wait(grid, self._eligible)
        return self._messages(arrays, self.plan.offset + server_round, "evaluate")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rnd = self.plan.offset + server_round
        if not self.sent:
            return None
        rows = []
        for msg, site in self._match(replies, rnd, "evaluate"):
            metrics = dict(msg.content["metrics"])
            rows.append(metrics)
            examples = int(sum(v for k, v in metrics.items() if k.endswith("-num-examples")))
            self.store.add_reply(
                Reply(
                    self.plan.phase,
                    rnd,
                    "evaluate",
                    site.name,
                    site.node_id,
                    examples,
                    metrics,
                    float("nan"),
                    0,
                )
            )
        merged: dict[str, float] = {}
        for task in self.plan.tasks:
            weight = f"{task}-num-examples"
            per_task = [
                {k: v for k, v in r.items() if k.startswith(f"{task}-") and k != weight} | {"w": r[weight]}
                for r in rows
                if r.get(weight, 0) > 0
            ]
            merged |= _weighted(per_task, weight_key="w")
        self.store.add_metrics(self.plan.phase, rnd, "federated-eval", merged)
        for task in self.plan.tasks:
            if f"{task}-auc" in merged:
                log.info(
                    "[%s round %d] %s validation: AUC %.3f, kappa %.3f, accuracy %.3f",
                    self.plan.phase,
                    rnd,
                    task,
                    merged[f"{task}-auc"],
                    merged.get(f"{task}-kappa", math.nan),
                    merged.get(f"{task}-accuracy", math.nan),
                )
        return MetricRecord(merged) if merged else None

    def summary(self) -> None:
        f = self.cfg.federation
        log.info(
            "fedretina %s phase: %s, rounds %d..%d, %d local epoch(s), min %d sites",
            self.plan.phase,
            f.strategy,
            self.plan.offset + 1,
            self.plan.total,
            f.local_epochs,
            f.min_sites,
        )

    # ------------------------------------------------------------- end of round
    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's evaluate_fn: server-side probe on public images, then this round's checkpoint."""
        rnd = self.plan.offset + server_round
        if server_round == 0 and self.plan.offset > 0:
            return None  # resumed: round `offset` was checkpointed and probed already
        numpy = {k: v.numpy() for k, v in arrays.items()}
        metrics = self.probe(rnd, numpy) if self.probe else {}
        if metrics:
            self.store.add_metrics(self.plan.phase, rnd, "server-probe", metrics)
        if server_round > 0:
            meta = {"run": self.plan.run_name, "run_uid": self.plan.run_uid, **self.plan.identity}
            path = self.checkpoints.save(self.plan.phase, rnd, numpy, self.adam, meta)
            self.store.add_checkpoint(self.plan.phase, rnd, path)
        return MetricRecord(metrics) if metrics else None

    # ------------------------------------------------------------------ helpers
    def _eligible(self, site: SiteInfo) -> bool:
        return self.plan.phase == "pretrain" or any(t in site.labelled for t in self.plan.tasks)

    def _required(self, site: SiteInfo) -> list[str]:
        if self.plan.phase == "pretrain":
            return list(self.reference)
        heads = tuple(f"heads.{t}." for t in self.plan.tasks if t in site.labelled)
        return [k for k in self.reference if k.startswith(("encoder.", *heads))]

    def _messages(self, arrays: ArrayRecord, rnd: int, kind: str) -> list[Message]:
        f = self.cfg.federation
        config = ConfigRecord(
            {
                "phase": self.plan.phase,
                "round": rnd,
                "total-rounds": self.plan.total,
                "local-epochs": f.local_epochs,
                "local-steps": f.local_steps,
                "strategy": f.strategy,
                "proximal-mu": f.proximal_mu if f.strategy == "fedprox" else 0.0,
                "tasks": list(self.plan.tasks),
                "classes": list(self.plan.tasks.values()),
                "run-uid": self.plan.run_uid,
            }
        )
        content = RecordDict({"arrays": arrays, "config": config})
        return [
            Message(content, dst_node_id=s.node_id, message_type=f"{kind}.{self.plan.phase}")
            for s in self.sent
        ]

    def _match(self, replies: Iterable[Message], rnd: int, kind: str) -> list[tuple[Message, SiteInfo]]:
        """Replies with content, paired with their sites; error replies and silent sites are recorded as
        failures (a dead node's error carries the SuperLink's id, so it shows as silent)."""
        by_node = {s.node_id: s for s in self.sent}
        good, failed = [], {}
        for msg in replies:
            node = msg.metadata.src_node_id
            site = by_node.get(node)
            if msg.has_error():
                reason = f"error reply: {_last_line(msg.error.reason)}"
                self.store.event(
                    "reply-error",
                    f"{self.plan.phase} round {rnd} {kind}: {self.directory.name(node)}: {reason}",
                    "error",
                )
                log.warning(
                    "%s round %d: %s from %s", self.plan.phase, rnd, reason, self.directory.name(node)
                )
                if site is not None:
                    failed[node] = reason
            elif site is not None:
                good.append((msg, site))
        answered = {site.node_id for _, site in good}
        for site in self.sent:
            if site.node_id not in answered:
                reason = failed.get(site.node_id, "no reply (node failed or timed out)")
                self.store.add_reply(
                    Reply(
                        self.plan.phase,
                        rnd,
                        kind,
                        site.name,
                        site.node_id,
                        0,
                        {},
                        float("nan"),
                        0,
                        accepted=False,
                        reason=reason,
                    )
                )
        return sorted(good, key=lambda pair: pair[1].name)

    def _record(self, candidates: list[Candidate], rnd: int, aggregate: Arrays | None) -> None:
        for c in candidates:
            reason = c.verdict.reason
            cos = (
                cosine(c.arrays, aggregate, self.reference)
                if aggregate is not None and reason is None
                else None
            )
            examples = c.metrics.get("num-examples", 0)
            self.store.add_reply(
                Reply(
                    self.plan.phase,
                    rnd,
                    "train",
                    c.site.name,
                    c.site.node_id,
                    int(examples) if isinstance(examples, int | float) and math.isfinite(examples) else 0,
                    c.metrics,
                    float(c.metrics.get("duration-s", math.nan)),
                    c.nbytes,
                    c.verdict.norm,
                    cos,
                    accepted=reason is None,
                    reason=reason or "",
                )
            )
            if reason:
                log.warning(
                    "%s round %d: rejected %s's update: %s", self.plan.phase, rnd, c.site.name, reason
                )


@dataclass(frozen=True)
class Candidate:
    """One site's train reply, with the verdict of its validation."""

    site: SiteInfo
    arrays: Arrays
    metrics: dict
    nbytes: int
    verdict: Verdict

    def update(self, tasks: dict[str, int]) -> Update:
        """The update to aggregate: weighted by its examples, each task head by that task's examples."""
        heads = {f"heads.{t}.": float(self.metrics.get(f"examples-{t}", 0)) for t in tasks}
        return Update(self.site.name, self.arrays, float(self.metrics["num-examples"]), heads)


def _last_line(text: str) -> str:
    """The exception line at the end of a (Ray-wrapped) traceback, for one-line records."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if line.strip()]
    return lines[-1] if lines else text


def _weighted(rows: Iterable[dict[str, float]], weight_key: str = "num-examples") -> dict[str, float]:
    """Example-weighted mean of every metric across replies, NaNs skipped."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for row in rows:
        w = float(row.get(weight_key, 1.0))
        for key, value in row.items():
            if key != weight_key and isinstance(value, int | float) and not math.isnan(value):
                sums[key] = sums.get(key, 0.0) + w * float(value)
                weights[key] = weights.get(key, 0.0) + w
    return {k: sums[k] / weights[k] for k in sums if weights[k] > 0}


def to_record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({k: torch.from_numpy(np.require(v, requirements="C")) for k, v in arrays.items()})


def encoder_arrays(arrays: Arrays) -> Arrays:
    """The encoder's entries of a SparK or task-model state (both keep it under `encoder.`)."""
    return {k: v for k, v in arrays.items() if k.startswith("encoder.")}
