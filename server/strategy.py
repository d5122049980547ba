"""One phase of the federation as a Flower Message-API strategy: Flower's hooks, nothing else.

- configure_train: wait for enough eligible sites (our deadline), send `train.<phase>` with the round spec;
- aggregate_train: replies come as they land (`server/replies.py`); each is validated (keys, shapes,
  dtypes, NaN/Inf, update norm), folded into `shared.federation.aggregation.RunningAverage` (exact sums, so
  the result does not depend on arrival order; per-key holders, so task heads only average among their sites)
  and sketched for its cosine with the aggregate, then dropped: the server holds one reply's weights at a
  time. Each reply is recorded with its verdict; FedAdam on top when asked. A round with fewer accepted sites
  than `min_sites` returns no model (the run keeps the old one, or tries the round again: `short_round`).
  Weights travel packed in one buffer each way (`shared/federation/wire.py:pack`); error replies are matched
  to the message they answer;
- configure/aggregate_evaluate (phase 2): federated evaluation on each site's validation images.

The run (`server/run.py`) calls the hooks round by round, then probes and checkpoints. What the round makes
of its replies is the strategy's (`shared/federation/strategies.py`): their average, a server optimiser's
step along it, a robust combine of every reply held (the trimmed mean), or, for a sequential strategy,
`cyclic_round`'s chain (with `carry_optimizer` the optimiser moments travel with it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import FitRes, parameters_to_ndarrays
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.directory import SiteDirectory, SiteInfo, error_text, sample_sites
from server.recorder import Recorder
from server.replies import stream_replies
from server.store import CROSS_KIND, TEST_KIND
from shared.federation.aggregation import (
    Arrays,
    Chain,
    RunningAverage,
    Sketch,
    Sketches,
    Update,
    Verdict,
    buffer_keys,
    check_moments,
    check_scores,
    check_update,
    cycle_order,
    merge_metrics,
    moments_start,
    site_update,
    sketched_cosine,
)
from shared.federation.securesum import REFUSALS, SecureLayout
from shared.federation.strategies import ServerMoments, strategy_of
from shared.federation.wire import (
    ARRAYS,
    DEVICES,
    EPSILON,
    LAYOUT,
    METRICS,
    MOMENTS,
    NUM_EXAMPLES,
    PACKED,
    PRETRAIN,
    REASON,
    REFUSAL,
    SECAGG_REFUSAL,
    SECONDS,
    SPEC,
    STEPS,
    RoundSpec,
    RunSpec,
    pack_records,
    task_key,
    to_wire,
    unpacked,
)
from shared.models import ENCODER, head_prefix
from shared.seeding import derive_seed
from shared.training.moments import state_entries
from shared.weights import save_weights, weights_meta

log = logging.getLogger(__name__)


TEST = TEST_KIND  # the final evaluation's message action and replies' kind


def cross_site_kind(site: str) -> str:
    """The kind of the replies that score `site`'s local model (the cross-site table)."""
    return CROSS_KIND + site


class FedRetina(Strategy):
    def __init__(
        self,
        run: RunSpec,
        phase: str,
        tasks: dict[str, int],
        directory: SiteDirectory,
        recorder: Recorder,
        adam: ServerMoments | None = None,
        carried: Arrays | None = None,
    ) -> None:
        self.run, self.phase, self.tasks = run, phase, tasks
        self.directory, self.recorder, self.adam = directory, recorder, adam
        self.federation = run.config.federation
        # the optimiser moments the last round ended with: cyclic's chain's (carry_optimizer), or the
        # server's own under MimeLite
        self.carried: Arrays = carried or {}
        self.reference: Arrays = {}
        self.sent: list[SiteInfo] = []
        self.outbox: list[tuple[Message, SiteInfo]] = []
        self.local_models: Path | None = None  # set: each accepted site's model is saved there (cross-site)

    # ------------------------------------------------------------------ training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.start_round(server_round, arrays, grid)
        own = strategy_of(self.federation.strategy).server_state
        return self._messages(arrays, server_round, "train", self.carried if own else None)

    def start_round(self, rnd: int, arrays: ArrayRecord, grid: Grid) -> list[SiteInfo]:
        """The round's sites, the weights they start from (the reference of their updates), recorded."""
        self.sent = self._participants(grid, rnd)
        self.reference = {k: v.numpy() for k, v in arrays.items()}
        self.recorder.round_started(rnd, len(self.sent))
        names = [s.name for s in self.sent]
        shown = ", ".join(names) if len(names) <= 8 else f"{len(names)} sites ({', '.join(names[:3])}, ...)"
        log.info("[%s round %d] training on %s", self.phase, rnd, shown)
        return self.sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        plan = strategy_of(self.federation.strategy)
        running, sketches = RunningAverage(self.reference), Sketches(self.reference)
        # MimeLite, SCAFFOLD: the sites' moments or control variates, averaged as their weights are,
        # become the server's
        moments = None
        if plan.server_state:
            entries = state_entries(plan, self._optimizer())
            moments = RunningAverage(moments_start(self.reference, self.carried, entries))
        candidates, held = [], []
        for msg, site in self._match(replies, server_round, "train"):
            candidate, sketch = self._candidate(msg, site), None
            if candidate.verdict.reason is None:
                if self.local_models is not None:
                    self._keep_local(candidate)
                update = candidate.update(self.tasks)
                if plan.holds_replies:
                    held.append(update)
                else:
                    running.add(update)
                if moments is not None:
                    moments.add(replace(update, arrays=candidate.moments))
                sketch = sketches.sketch(candidate.arrays)
            candidates.append(candidate.folded(sketch))  # its weights dropped (or held: a robust combine)
        candidates.sort(key=lambda c: c.site.name)
        accepted = [c for c in candidates if c.verdict.reason is None]
        if len(accepted) < self.directory.min_sites:
            for c in candidates:
                self.recorder.trained(server_round, c.site, **c.record(None))
            self.recorder.short(server_round, len(candidates), len(accepted), self.directory.min_sites)
            return None, None
        combined = plan.combine(held, self.reference, self.federation) if plan.combine else running.result()
        new = self._server_step(combined)
        if moments is not None:
            self.carried = moments.result()
        change = sketches.sketch(new)
        for c in candidates:
            self.recorder.trained(
                server_round, c.site, **c.record(change if c.verdict.reason is None else None)
            )
        return self._finished(server_round, new, [c.metrics for c in accepted], len(candidates))

    def cyclic_round(self, rnd: int, arrays: ArrayRecord, grid: Grid, timeout: float) -> ArrayRecord | None:
        """Cyclic weight transfer: the round's sites train one after another in `cycle_order`, each from the
        model the previous accepted one returned, so a round makes as many sequential optimiser steps as a
        centralised epoch over their pooled images (FedAvg averages parallel ones). A rejected or silent
        site is passed over. The round's BatchNorm statistics are the sites' average (`Chain`). Same bytes as
        FedAvg (3x with `carry_optimizer`, whose moments follow the model and outlive the round); each site
        waits for the one before it. None when fewer than `min_sites` were accepted (the round is short and
        the model and moments kept)."""
        by_name = {s.name: s for s in self.start_round(rnd, arrays, grid)}
        carry = self.federation.carry_optimizer
        chain = Chain({k: v.numpy() for k, v in arrays.items()}, self.carried)
        candidates = []
        for name in cycle_order(by_name, self.run.config.seed, self.phase, rnd):
            self.sent, self.reference = [by_name[name]], chain.model
            asked = self._messages(to_record(chain.model), rnd, "train", chain.moments if carry else None)
            for msg, site in self._match(stream_replies(grid, asked, timeout), rnd, "train"):
                candidate = self._candidate(msg, site)
                if candidate.verdict.reason is None:
                    chain.add(candidate.update(self.tasks), candidate.moments)
                candidates.append(candidate.folded(None))
        accepted = [c for c in candidates if c.verdict.reason is None]
        enough = len(accepted) >= self.directory.min_sites
        for c in candidates:
            record = c.record(None) | {"aggregated": enough and c.verdict.reason is None}
            self.recorder.trained(rnd, c.site, **record)
        if not enough:
            self.recorder.short(rnd, len(candidates), len(accepted), self.directory.min_sites)
            return None
        self.carried = chain.moments
        return self._finished(rnd, chain.result(), [c.metrics for c in accepted], len(candidates))[0]

    def conclude_secure(self, rnd: int, outcome: SecureResult) -> ArrayRecord | None:
        """A SecAgg+ round's end (`server/secure.py`): each site's fate from its clear metrics (its update's
        norm and cosine are hidden), the new model from the unmasked sum; None when the round is short."""
        if outcome.results is None:
            for site in self.sent:
                self.recorder.failed(rnd, "train", site, HALTED, None)
            self.recorder.halted(rnd)
            return None
        by_node = {s.node_id: s for s in self.sent}
        answered = {node: dict(fitres.metrics) for node, fitres in outcome.results}
        for site in self.sent:
            if site.node_id not in answered:
                self.recorder.failed(rnd, "train", site, DROPPED, None)
        accepted = [m for m in answered.values() if int(m.get(SECAGG_REFUSAL, 0)) == 0]
        mean = parameters_to_ndarrays(outcome.results[0][1].parameters)[0] if outcome.results else None
        steps = int(max((m.get(STEPS, 0) for m in accepted), default=0))
        new = outcome.layout.decode(mean, len(outcome.results), self.reference, steps) if accepted else None
        broken = new is not None and not all(np.isfinite(v).all() for v in new.values())
        enough = len(accepted) >= self.directory.min_sites and not broken
        nbytes = outcome.layout.size * 8  # every answering site sent a whole vector, zeros if it refused
        for node, metrics in sorted(answered.items(), key=lambda kv: by_node[kv[0]].name):
            code = int(metrics.get(SECAGG_REFUSAL, 0))
            reason = REFUSALS.get(code) or (BROKEN_SUM if broken else None)
            self.recorder.trained(
                rnd,
                by_node[node],
                metrics=metrics,
                nbytes=nbytes,
                verdict=Verdict(reason, None),
                cosine=None,
                aggregated=enough and code == 0,
            )
        if not enough or new is None:
            self.recorder.short(rnd, len(answered), 0 if broken else len(accepted), self.directory.min_sites)
            return None
        return self._finished(rnd, self._server_step(new), accepted, len(answered))[0]

    def _server_step(self, average: Arrays) -> Arrays:
        """The new global weights from the round's average: itself, or the strategy's server optimiser's step
        along it (FedAdam, FedAvgM), whose state the run keeps (and checkpoints) across rounds."""
        step = strategy_of(self.federation.strategy).step
        if step is None:
            return average
        new, self.adam = step(
            self.reference, average, self.adam, self.federation, buffer_keys(self.reference)
        )
        return new

    def _finished(
        self, rnd: int, new: Arrays, accepted: list[dict], replied: int
    ) -> tuple[ArrayRecord, MetricRecord]:
        counts = {NUM_EXAMPLES, STEPS, DEVICES, *(task_key(t, NUM_EXAMPLES) for t in self.tasks)}
        timed = {SECONDS, EPSILON}  # median and max: the worst site's epsilon is the one to watch
        merged = merge_metrics(accepted, NUM_EXAMPLES, summed=counts, timed=timed)
        self.recorder.finished(rnd, replied, len(accepted), merged)
        return to_record(new), MetricRecord(merged)

    # ---------------------------------------------------------------- evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.phase == PRETRAIN:
            self.sent = []  # no federated evaluation in pretraining (the server probes instead)
            return []
        self.sent = self._participants(grid, server_round)
        return self._messages(arrays, server_round, "evaluate")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if not self.sent:
            return None
        rows = self._scores(replies, server_round, "evaluate")
        merged: dict[str, float] = {}
        for task in self.tasks:  # each task's metrics weighted by its own validation images
            weight = task_key(task, NUM_EXAMPLES)
            mine = [{k: v for k, v in r.items() if k.startswith(f"{task}-")} for r in rows]
            merged |= merge_metrics(mine, weight, summed={weight})
        self.recorder.metrics(server_round, "federated-eval", merged)
        return MetricRecord(merged) if merged else None

    def configure_test(self, rnd: int, arrays: ArrayRecord, grid: Grid) -> Iterable[Message]:
        """The final model to every site that holds a task's labels (none sampled out), to score on its own
        held-out test patients; a site gone by now is left out (the model is already saved)."""
        self.sent = self.directory.wait(grid, self._eligible, needed=0)
        return self._messages(arrays, rnd, "evaluate", action=TEST)

    def aggregate_test(self, rnd: int, replies: Iterable[Message], kind: str = TEST) -> None:
        """Each site's test scores, as it sent them (pooling would need the predictions, which stay at the
        sites): the summary and the dashboard show them per site, with their image-weighted mean. `kind`
        names the model scored: the final model (`test`) or one site's local model (`cross_site_kind`)."""
        self._scores(replies, rnd, kind)

    def _keep_local(self, candidate: Candidate) -> None:
        """A site's own model of this round (its weights over the round's start, where it trained no head),
        saved for the cross-site table as an export `fedretina site evaluate` reads."""
        assert self.local_models is not None
        model = {k: torch.from_numpy(np.array(v)) for k, v in {**self.reference, **candidate.arrays}.items()}
        meta = weights_meta(self.run.config, "task-model", tasks=self.tasks, site=candidate.site.name)
        save_weights(self.local_models / f"{candidate.site.name}.safetensors", model, meta)

    def _scores(self, replies: Iterable[Message], rnd: int, kind: str) -> list[dict[str, float]]:
        """Each site's evaluation metrics (`kind` evaluate or test), recorded as they come; a reply whose
        counts or scores are malformed (`check_scores`) is recorded as failed, with why, and left out."""
        out = []
        for msg, site in self._match(replies, rnd, kind):
            metrics = dict(msg.content[METRICS])
            wrong = check_scores(metrics, self.tasks)
            if wrong is not None:
                self.recorder.failed(rnd, kind, site, f"malformed evaluation metrics: {wrong}", None)
                continue
            examples = sum(int(metrics.get(task_key(t, NUM_EXAMPLES), 0)) for t in self.tasks)
            self.recorder.evaluated(rnd, site, metrics, examples, kind=kind)
            out.append(metrics)
        return out

    def summary(self) -> None:
        f = self.federation
        work = f.local_work(self.phase)
        log.info("%s phase: %s, %s per round, min %d sites", self.phase, f.strategy, work, f.min_sites)

    # ------------------------------------------------------------------ helpers
    def _participants(self, grid: Grid, rnd: int) -> list[SiteInfo]:
        """The round's sites: every eligible one, or a seeded sample of `federation.participation` of them
        (the same for training and evaluation, and the same again when the round is retried or resumed)."""
        seed = derive_seed(self.run.config.seed, "participants", self.phase, rnd)
        live = self.directory.wait(grid, self._eligible)
        return sample_sites(live, self.federation.participation, seed, self.directory.min_sites)

    def _eligible(self, site: SiteInfo) -> bool:
        return self.phase == PRETRAIN or any(t in site.labelled for t in self.tasks)

    def _messages(
        self, arrays: ArrayRecord, rnd: int, kind: str, moments: Arrays | None = None, action: str = ""
    ) -> list[Message]:
        """One message per sent site (`kind.action`, the phase by default); kept, since the grid gives each
        its id when it pushes it."""
        spec = ConfigRecord(to_wire(RoundSpec(self.run, self.phase, rnd, self.tasks)))
        buffers, layouts = pack_records({k: v.numpy() for k, v in arrays.items()}, moments)
        packed = {name: ArrayRecord({PACKED: Array(buffer)}) for name, buffer in buffers.items()}
        content = RecordDict({**packed, LAYOUT: ConfigRecord(layouts), SPEC: spec})
        self.outbox = [
            (Message(content, dst_node_id=s.node_id, message_type=f"{kind}.{action or self.phase}"), s)
            for s in self.sent
        ]
        return [message for message, _ in self.outbox]

    def _candidate(self, msg: Message, site: SiteInfo) -> Candidate:
        metrics = dict(msg.content[METRICS])
        if REFUSAL in msg.content:  # the site chose not to train (its privacy budget): no weights
            reason = str(msg.content[REFUSAL][REASON])
            return Candidate(site, {}, metrics, 0, Verdict(f"refused by the site: {reason}", None))
        nbytes = sum(msg.content[r].count_bytes() for r in (ARRAYS, MOMENTS) if r in msg.content)
        try:
            arrays = unpacked(msg.content)
        except (KeyError, ValueError) as exc:
            return Candidate(site, {}, metrics, nbytes, Verdict(f"malformed weights: {exc}", None))
        required = list(self.reference)
        if self.phase != PRETRAIN:  # the encoder and the heads of the tasks this site holds
            heads = [head_prefix(t) for t in self.tasks if t in site.labelled]
            required = [k for k in required if k.startswith((ENCODER, *heads))]
        verdict = check_update(
            arrays,
            self.reference,
            required=required,
            max_norm=self.federation.max_update_norm,
            examples=metrics.get(NUM_EXAMPLES),
        )
        moments: Arrays = {}
        if strategy_of(self.federation.strategy).moments_travel(self.federation) and verdict.reason is None:
            moments, wrong = self._moments(msg.content)
            verdict = Verdict(wrong, verdict.norm) if wrong is not None else verdict
        return Candidate(site, arrays, metrics, nbytes, verdict, moments)

    def _moments(self, content: RecordDict) -> tuple[Arrays, str | None]:
        """The optimiser moments a site hands on (the chain's, or MimeLite's for the server), and why they
        cannot be (or None)."""
        if MOMENTS not in content:
            return {}, f"sent no optimiser moments (strategy {self.federation.strategy} needs them)"
        try:
            moments = unpacked(content, MOMENTS)
        except (KeyError, ValueError) as exc:
            return {}, f"malformed optimiser moments: {exc}"
        entries = state_entries(strategy_of(self.federation.strategy), self._optimizer())
        return moments, check_moments(moments, self.reference, entries)

    def _optimizer(self) -> str:
        cfg = self.run.config
        return cfg.pretrain.optimizer if self.phase == PRETRAIN else cfg.finetune.optimizer

    def _match(self, replies: Iterable[Message], rnd: int, kind: str) -> Iterator[tuple[Message, SiteInfo]]:
        """Replies with content, paired with their sites, as they come. Error replies are matched on the
        message they answer (a dead node's error comes from the SuperLink's id, not the node's) and
        recorded with Flower's code; once `replies` ends, a sent site with no reply at all timed out. A
        reply to another round's message, or a second reply to one of this round's (replayed), is ignored:
        each site counts once per round."""
        asked = {message.metadata.message_id: site for message, site in self.outbox}
        answered, failed = set(), {}
        for msg in replies:
            site = asked.get(msg.metadata.reply_to_message_id)
            if site is None or site.node_id in answered:
                continue  # not an answer to this round's messages, or one already counted
            if msg.has_error():
                failed[site.node_id] = (int(msg.error.code), error_text(msg))
            else:
                answered.add(site.node_id)
                yield msg, site
        timeout = self.federation.reply_timeout_s
        for site in self.sent:
            if site.node_id not in answered:
                code, reason = failed.get(site.node_id, (None, f"timed out: no reply within {timeout:g} s"))
                self.recorder.failed(rnd, kind, site, reason, code)


HALTED = "secure aggregation halted: fewer sites than its reconstruction threshold answered; no update used"
DROPPED = "dropped out of the secure aggregation before sending its masked update"
BROKEN_SUM = "the secure sum holds NaN or Inf (one site's update was broken; which one is hidden)"


@dataclass(frozen=True)
class SecureResult:
    """What SecAgg+'s workflow left: the round's layout and each answering site's reply (its vector
    replaced by the unmasked mean of all of them), or None when the protocol halted."""

    layout: SecureLayout
    results: list[tuple[int, FitRes]] | None


@dataclass(frozen=True)
class Candidate:
    """One site's train reply, with the verdict of its validation; once folded into the round's sums, its
    weights are dropped and only their sketch is kept."""

    site: SiteInfo
    arrays: Arrays
    metrics: dict
    nbytes: int
    verdict: Verdict
    moments: Arrays = field(default_factory=dict)  # carry_optimizer: the optimiser moments to hand on
    sketch: Sketch | None = None

    def update(self, tasks: dict[str, int]) -> Update:
        return site_update(self.site.name, self.arrays, self.metrics, tasks)

    def folded(self, sketch: Sketch | None) -> Candidate:
        return replace(self, arrays={}, moments={}, sketch=sketch)

    def record(self, change: Sketch | None) -> dict:
        """The recorder's fields; `change` = the sketched aggregate change when this update was averaged in
        (its cosine with it is then estimated)."""
        aggregated = change is not None and self.sketch is not None
        similarity = sketched_cosine(self.sketch, change) if aggregated else None
        return {
            "metrics": self.metrics,
            "nbytes": self.nbytes,
            "verdict": self.verdict,
            "cosine": similarity,
            "aggregated": aggregated,
        }


def to_record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({k: torch.from_numpy(np.require(v, requirements="C")) for k, v in arrays.items()})
