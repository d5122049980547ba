"""What a site keeps between the rounds of a federated run, in its own folder (never sent).

`<site state>/federation/[<virtual site>/]<run uid>/`: the site's own folder (its YAML) and the run's
content-free uid, checked where the spec is parsed (`shared/federation/wire.py`); the run's name, which the
server chooses, is only recorded in the progress file, never made a path.
- `<phase>-optimizer-rNNNN.safetensors`: the optimiser state after round NNNN, so a site continues its
  LAMB / AdamW moments as a centralised run would, and a restarted node loses nothing;
- `<phase>-bn-rNNNN.safetensors` (FedBN): the site's own BatchNorm parameters and statistics;
- `<phase>-control-rNNNN.safetensors` (SCAFFOLD): the site's own control variates;
- `<phase>-progress.json`: where the site stands (round, global step), for people and audits.
The site's last `KEEP_ROUNDS` rounds are kept per phase, so a server resumed from an earlier checkpoint
finds them.
A round reads the latest kept round before it: the previous one, or an earlier one for a site that sat
rounds out (partial participation), whose own BatchNorm and moments must not fall back to the server's.
Data order needs no state: each epoch's order, augmentations and masks are derived from (run seed, phase,
global epoch, site).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from shared.data.site import Site
from shared.federation.aggregation import bn_keys
from shared.federation.strategies import strategy_of
from shared.federation.wire import RoundSpec
from shared.names import check_run_uid, inside
from shared.rundir import atomic_write_text
from shared.training.checkpoint import load_checkpoint, save_checkpoint
from shared.weights import check_meta, load_into, load_weights, save_weights, weights_meta

log = logging.getLogger(__name__)
KEEP_ROUNDS = 3


class SiteState:
    """The files one site keeps for one federated run."""

    def __init__(self, site: Site, spec: RoundSpec) -> None:
        self.spec = spec
        self.dir = state_dir(site, spec.run.run_uid)

    @property
    def fedbn(self) -> bool:
        """Under FedBN the site's BatchNorm layers are its own: kept here, never taken from the server."""
        return strategy_of(self.spec.config.federation.strategy).local_batchnorm

    def optimizer_before(self) -> dict | None:
        """The optimiser state this site kept after its last round before this one, when the run keeps it
        (the previous round, unless the site sat a round out under partial participation)."""
        spec = self.spec
        if not spec.config.federation.keep_optimizer_state or spec.round < 2:
            return None
        found = _latest(self.dir, spec.phase, "optimizer", spec.round - 1)
        if found is None:
            log.warning(
                "no optimiser state for %s before round %d in %s: starting it afresh",
                spec.phase,
                spec.round,
                self.dir,
            )
            return None
        rnd, path = found
        return load_checkpoint(
            path, expected=_expected(spec.phase, "site-optimizer", rnd, spec.run.run_uid)
        ).optimizer

    def load_bn(self, model: nn.Module, rnd: int) -> None:
        """FedBN: replace the server's BatchNorm entries by this site's own as of round `rnd`, if any."""
        phase = self.spec.phase
        found = own_batchnorm(self.dir, phase, rnd, self.spec.run.run_uid)
        if found is not None:
            kept, tensors = found
            load_into(model, {**model.state_dict(), **tensors}, _state_file(self.dir, phase, "bn", kept))

    def controls_before(self) -> dict[str, torch.Tensor]:
        """SCAFFOLD: this site's control variates as of its last round before this one (none before it
        trained: zero). Every parameter it ever stepped keeps its latest, so they are carried forward."""
        spec = self.spec
        found = _latest(self.dir, spec.phase, "control", spec.round - 1)
        if found is None:
            return {}
        rnd, path = found
        tensors, meta = load_weights(path)
        check_meta(path, meta, _expected(spec.phase, "site-control", rnd, spec.run.run_uid))
        return tensors

    def after_round(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        step: int,
        controls: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Keep this round's optimiser state (and BatchNorm under FedBN, under SCAFFOLD every control
        variate the site holds, `controls`), and record the progress."""
        spec, rnd = self.spec, self.spec.round
        if self.fedbn:
            keys = bn_keys(model)
            tensors = {k: v for k, v in model.state_dict().items() if k in keys}
            save_weights(_state_file(self.dir, spec.phase, "bn", rnd), tensors, self._meta("site-batchnorm"))
        if controls is not None:
            save_weights(
                _state_file(self.dir, spec.phase, "control", rnd), controls, self._meta("site-control")
            )
        save_checkpoint(
            _state_file(self.dir, spec.phase, "optimizer", rnd),
            self._meta("site-optimizer"),
            optimizer=optimizer,
        )
        for kind in ("bn", "control", "optimizer"):
            for _, path in _kept(self.dir, spec.phase, kind)[:-KEEP_ROUNDS]:
                path.unlink(missing_ok=True)
        record = {"run": spec.config.name, "round": rnd, "total_rounds": spec.rounds, "step": step}
        atomic_write_text(self.dir / f"{spec.phase}-progress.json", json.dumps(record))

    def _meta(self, kind: str) -> dict:
        spec = self.spec
        return weights_meta(spec.config, kind, phase=spec.phase, round=spec.round, run_uid=spec.run.run_uid)


def state_dir(site: Site, run_uid: str) -> Path:
    """Where `site` keeps its state for one federated run: below its own folder, whatever the uid says."""
    return inside(site.federation_dir, check_run_uid(run_uid))


def own_batchnorm(
    directory: Path, phase: str, rnd: int, run_uid: str
) -> tuple[int, dict[str, torch.Tensor]] | None:
    """A FedBN site's own BatchNorm entries as of round `rnd` of `phase` (its latest kept round up to `rnd`,
    with that round), or None before it kept any. The site trains from them next round and predicts with
    them, so `fedretina compare` scores a FedBN arm with them too."""
    found = _latest(directory, phase, "bn", rnd)
    if found is None:
        return None
    kept, path = found
    tensors, meta = load_weights(path)
    check_meta(path, meta, _expected(phase, "site-batchnorm", kept, run_uid))
    return kept, tensors


def _state_file(directory: Path, phase: str, kind: str, rnd: int) -> Path:
    return directory / f"{phase}-{kind}-r{rnd:04d}.safetensors"


def _kept(directory: Path, phase: str, kind: str) -> list[tuple[int, Path]]:
    """(round, file) of every round of `kind` kept, oldest first."""
    prefix = f"{phase}-{kind}-r"
    found = []
    for path in directory.glob(f"{prefix}*.safetensors"):
        number = path.name[len(prefix) : -len(".safetensors")]
        if number.isdigit():
            found.append((int(number), path))
    return sorted(found)


def _latest(directory: Path, phase: str, kind: str, rnd: int) -> tuple[int, Path] | None:
    """The latest kept round of `kind` up to `rnd`: files after it belong to rounds a resumed server will
    train again, so they are never read."""
    earlier = [found for found in _kept(directory, phase, kind) if found[0] <= rnd]
    return earlier[-1] if earlier else None


def _expected(phase: str, kind: str, rnd: int, run_uid: str) -> dict:
    return {"kind": kind, "phase": phase, "round": rnd, "run_uid": run_uid}
