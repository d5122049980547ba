"""What a site keeps between the rounds of a federated run, in its own folder (never sent).

`<site state>/federation/[<virtual site>/]<run name>/<run uid>/`:
- `<phase>-optimizer-rNNNN.safetensors`: the optimiser state after round NNNN, so a site continues its
  LAMB / AdamW moments as a centralised run would, and a restarted node loses nothing;
- `<phase>-bn-rNNNN.safetensors` (FedBN): the site's own BatchNorm parameters and statistics;
- `<phase>-progress.json`: where the site stands (round, global step), for people and audits.
The last `KEEP_ROUNDS` rounds are kept per phase, so a server resumed from an earlier checkpoint finds them.
Data order needs no state: each epoch's order, augmentations and masks are derived from (run seed, phase,
global epoch, site).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from shared.aggregation import bn_keys
from shared.data.site import Site
from shared.rundir import atomic_write_text
from shared.training.checkpoint import load_checkpoint, save_checkpoint
from shared.weights import check_meta, load_into, load_weights, save_weights, weights_meta
from shared.wire import RoundSpec

log = logging.getLogger(__name__)
KEEP_ROUNDS = 3


class SiteState:
    """The files one site keeps for one federated run."""

    def __init__(self, site: Site, spec: RoundSpec) -> None:
        self.spec = spec
        self.dir = site.federation_dir / spec.config.name / spec.run.run_uid

    @property
    def fedbn(self) -> bool:
        """Under FedBN the site's BatchNorm layers are its own: kept here, never taken from the server."""
        return self.spec.config.federation.strategy == "fedbn"

    def optimizer_before(self) -> dict | None:
        """The optimiser state this site saved after the previous round, when the run keeps it."""
        spec, rnd = self.spec, self.spec.round - 1
        if not spec.config.federation.keep_optimizer_state or rnd < 1:
            return None
        path = self._path("optimizer", rnd)
        if not path.exists():
            log.warning(
                "no optimiser state for %s round %d in %s: starting it afresh", spec.phase, rnd, self.dir
            )
            return None
        return load_checkpoint(path, expected=self._expected(rnd, "site-optimizer")).optimizer

    def load_bn(self, model: nn.Module, rnd: int) -> None:
        """FedBN: replace the server's BatchNorm entries by this site's own after round `rnd`, if any."""
        path = self._path("bn", rnd)
        if path.exists():
            tensors, meta = load_weights(path)
            check_meta(path, meta, self._expected(rnd, "site-batchnorm"))
            load_into(model, {**model.state_dict(), **tensors}, path)

    def after_round(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Keep this round's optimiser state (and BatchNorm under FedBN), and record the progress."""
        spec, rnd = self.spec, self.spec.round
        if self.fedbn:
            keys = bn_keys(model)
            tensors = {k: v for k, v in model.state_dict().items() if k in keys}
            save_weights(self._path("bn", rnd), tensors, self._meta("site-batchnorm"))
        save_checkpoint(self._path("optimizer", rnd), self._meta("site-optimizer"), optimizer=optimizer)
        for kind in ("bn", "optimizer"):
            self._path(kind, rnd - KEEP_ROUNDS).unlink(missing_ok=True)
        record = {"round": rnd, "total_rounds": spec.rounds, "step": step}
        atomic_write_text(self.dir / f"{spec.phase}-progress.json", json.dumps(record))

    def _path(self, kind: str, rnd: int) -> Path:
        return self.dir / f"{self.spec.phase}-{kind}-r{rnd:04d}.safetensors"

    def _meta(self, kind: str) -> dict:
        spec = self.spec
        return weights_meta(spec.config, kind, phase=spec.phase, round=spec.round, run_uid=spec.run.run_uid)

    def _expected(self, rnd: int, kind: str) -> dict:
        return {"kind": kind, "phase": self.spec.phase, "round": rnd, "run_uid": self.spec.run.run_uid}
