"""What a phase's rounds leave in the run store: one named call per fact, so the strategy never assembles a
store row itself."""

from __future__ import annotations

import logging
import math
from typing import Any

from server.directory import SiteInfo
from server.store import Reply, RunStore
from shared.federation.aggregation import Verdict
from shared.federation.wire import NUM_EXAMPLES, SECONDS

log = logging.getLogger(__name__)


class Recorder:
    def __init__(self, store: RunStore, phase: str) -> None:
        self.store, self.phase = store, phase
        self.attempt = 1  # of the current round (the run counts them)

    def round_started(self, rnd: int, sites: int) -> None:
        self.store.round_started(self.phase, rnd, sites)

    def trained(
        self,
        rnd: int,
        site: SiteInfo,
        *,
        metrics: dict[str, float],
        nbytes: int,
        verdict: Verdict,
        cosine: float | None,
        aggregated: bool,
    ) -> None:
        """A train reply, accepted or rejected (with the reason its validation gave), and whether it was
        averaged into the new model."""
        examples = metrics.get(NUM_EXAMPLES, 0)
        countable = isinstance(examples, int | float) and math.isfinite(examples)
        self._reply(
            rnd,
            "train",
            site,
            num_examples=int(examples) if countable else 0,
            metrics=metrics,
            duration=float(metrics.get(SECONDS, math.nan)),
            bytes=nbytes,
            update_norm=verdict.norm,
            cosine=cosine,
            accepted=verdict.reason is None,
            reason=verdict.reason or "",
            aggregated=aggregated,
        )
        if verdict.reason:
            log.warning("%s round %d: rejected %s's update: %s", self.phase, rnd, site.name, verdict.reason)

    def evaluated(
        self, rnd: int, site: SiteInfo, metrics: dict[str, float], examples: int, kind: str = "evaluate"
    ) -> None:
        """A site's scores of the round's model: on its validation images, or (`kind` "test") the final
        model's on its held-out test patients."""
        self._reply(rnd, kind, site, num_examples=examples, metrics=metrics)

    def failed(self, rnd: int, kind: str, site: SiteInfo, reason: str, code: int | None) -> None:
        """A site sent nothing usable: an error reply (with Flower's code), or no reply before the timeout."""
        self._reply(rnd, kind, site, accepted=False, reason=reason, error_code=code)
        self.store.event("reply-failed", f"{self.phase} round {rnd} {kind}: {site.name}: {reason}", "error")
        log.warning("%s round %d: %s: %s", self.phase, rnd, site.name, reason)

    def short(self, rnd: int, replied: int, accepted: int, needed: int) -> None:
        """Too few accepted updates: the model is kept (and the round may be tried again)."""
        status = f"skipped: {accepted} accepted update(s), {needed} needed"
        self._kept(rnd, replied, accepted, status, "round-short", "warning")

    def halted(self, rnd: int) -> None:
        """SecAgg+ halted (too few sites left to unmask the sum): the model is kept, as for a short round."""
        self._kept(rnd, 0, 0, "halted: secure aggregation could not unmask the sum", "round-halted", "error")

    def _kept(self, rnd: int, replied: int, accepted: int, status: str, kind: str, level: str) -> None:
        self.store.round_finished(self.phase, rnd, replied, accepted, status)
        self.store.event(kind, f"{self.phase} round {rnd} attempt {self.attempt} {status}", level)
        log.warning("%s round %d %s; the model is unchanged", self.phase, rnd, status)

    def retrying(self, rnd: int, attempts: int) -> None:
        message = f"{self.phase} round {rnd}: trying again (attempt {self.attempt + 1} of {attempts})"
        self.store.event("round-retry", message, "warning")
        log.warning("%s", message)
        self.attempt += 1

    def finished(self, rnd: int, replied: int, accepted: int, metrics: dict[str, float]) -> None:
        self.store.add_metrics(self.phase, rnd, "train", metrics)
        self.store.round_finished(self.phase, rnd, replied, accepted, "ok")

    def metrics(self, rnd: int, source: str, values: dict[str, float]) -> None:
        if values:
            self.store.add_metrics(self.phase, rnd, source, values)

    def _reply(self, rnd: int, kind: str, site: SiteInfo, **fields: Any) -> None:
        self.store.add_reply(
            Reply(self.phase, rnd, kind, site.name, site.node_id, attempt=self.attempt, **fields)
        )
