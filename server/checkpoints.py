"""Server checkpoints: after every round, the global weights (and FedAdam's moments, or the optimiser
moments cyclic weight transfer carries from round to round) as safetensors with the record of
`shared.weights.weights_meta` (kind, architecture, settings, run uid, scenario, tasks) plus the phase, round
and FedAdam step. The newest few per phase are kept, the last of a phase always.
A server restarted with resume continues after the newest one; all other randomness is derived from
(run seed, round, site), so the continued run computes what the uninterrupted one would have.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.federation.aggregation import Arrays
from shared.federation.strategies import ServerMoments
from shared.federation.wire import PHASES
from shared.weights import load_weights, save_weights

NAME = re.compile(rf"^({'|'.join(PHASES)})-r(\d{{4}})\.safetensors$")


@dataclass(frozen=True)
class Saved:
    phase: str
    round: int
    arrays: Arrays
    adam: ServerMoments | None
    meta: dict[str, Any]
    carried: Arrays  # cyclic's chain's moments (carry_optimizer), MimeLite's or SCAFFOLD's server state


class Checkpoints:
    def __init__(self, directory: Path, keep: int = 3) -> None:
        self.dir, self.keep = directory, keep

    def path(self, phase: str, rnd: int) -> Path:
        return self.dir / f"{phase}-r{rnd:04d}.safetensors"

    def save(
        self,
        phase: str,
        rnd: int,
        arrays: Arrays,
        adam: ServerMoments | None,
        meta: dict[str, Any],
        carried: Arrays | None = None,
    ) -> Path:
        tensors = _prefixed("global.", arrays) | _prefixed("carried.", carried or {})
        if adam is not None:
            tensors |= _prefixed("adam.m.", adam.m) | _prefixed("adam.v.", adam.v)
        record = {**meta, "phase": phase, "round": rnd, "adam_step": adam.step if adam else None}
        path = self.path(phase, rnd)
        save_weights(path, tensors, record)
        for old in self.rounds(phase)[: -self.keep]:
            self.path(phase, old).unlink(missing_ok=True)
        return path

    def rounds(self, phase: str) -> list[int]:
        found = [NAME.match(p.name) for p in self.dir.glob("*.safetensors")] if self.dir.is_dir() else []
        return sorted(int(m.group(2)) for m in found if m and m.group(1) == phase)

    def latest(self) -> Saved | None:
        for phase in reversed(PHASES):
            rounds = self.rounds(phase)
            if rounds:
                return self.load(phase, rounds[-1])
        return None

    def load(self, phase: str, rnd: int) -> Saved:
        tensors, meta = load_weights(self.path(phase, rnd))
        adam = None
        if meta.get("adam_step") is not None:
            m, v = _unprefixed("adam.m.", tensors), _unprefixed("adam.v.", tensors)
            adam = ServerMoments(m, v, int(meta["adam_step"]))
        arrays, carried = _unprefixed("global.", tensors), _unprefixed("carried.", tensors)
        return Saved(phase, rnd, arrays, adam, meta, carried)


def _prefixed(prefix: str, arrays: Arrays) -> dict[str, torch.Tensor]:
    """`arrays` as tensors under `prefix`: one checkpoint file holds several named sets."""
    return {f"{prefix}{k}": torch.from_numpy(np.require(v, requirements="C")) for k, v in arrays.items()}


def _unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> Arrays:
    return {k[len(prefix) :]: v.numpy() for k, v in tensors.items() if k.startswith(prefix)}
