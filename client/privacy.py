"""A site's privacy policy for a federated round: the run's noise, the budget check, the ledger entry.

The site decides, from its own YAML's budget (`privacy: {target_epsilon, delta}`) and its dataset's ledger
(`<state>/privacy/<site>.jsonl`): at a run's first private round here it picks the noise for the run's
whole remaining plan (every round of both phases, after all it spent before) unless the run fixes
`privacy.noise_multiplier`; it refuses any round that would take its epsilon past the budget; and it
records a round's steps in the ledger BEFORE the reply leaves, so a crash can only over-count.

Epsilon is a patient's: the site's epsilon is that of its worst-off patient, every release that used them
composed, whichever run, seed or simulated part used them (a simulation deals a dataset's patients into
other parts under another seed; the ledger is the dataset's and each release names its patients).
"""

from __future__ import annotations

import logging
import math

import pandas as pd

from shared.data.manifest import labelled_counts
from shared.data.site import Site
from shared.data.site_config import SiteConfig
from shared.federation.wire import FINETUNE, PRETRAIN, RoundSpec
from shared.privacy.accounting import Mechanism, epsilon, group_bound, noise_for
from shared.privacy.ledger import Ledger, data_fingerprint
from shared.privacy.sgd import PrivateSGD
from shared.training.finetune import finetune_split
from shared.training.phase import Span

log = logging.getLogger(__name__)


class SitePrivacy:
    """One site's privacy bookkeeping for one round of a private run."""

    def __init__(self, site: Site, spec: RoundSpec) -> None:
        self.site, self.spec, self.cfg = site, spec, spec.config
        self.budget = site.config.privacy
        self.ledger = Ledger(site.ledger_path)
        self.patients = sorted(set(site.rows["patient_id"].astype(str)))
        self._sizes: dict[str, tuple[dict[str, int], int]] = {}

    @property
    def epsilon(self) -> float:
        """What this site's worst-off patient has had released, composed, at its delta."""
        return self.ledger.epsilon(self.budget.delta, patients=self.patients)

    def _after(self, mechanisms: list[Mechanism]) -> float:
        """The worst-off patient's epsilon once `mechanisms` are released too."""
        return max(
            epsilon([*h, *mechanisms], self.budget.delta) for h in self.ledger.histories(self.patients)
        )

    def round_plan(self, phase: str, rnd: int) -> list[tuple[float, int]]:
        """(q, steps) of round `rnd` of `phase` at this site."""
        f = self.cfg.federation
        rounds = f.rounds_pretrain if phase == PRETRAIN else f.rounds_finetune
        span = Span.round(rnd, rounds, f.local_epochs, f.steps_in(phase))
        return span.private_plan(*self._images(phase))

    def sigma(self) -> float | None:
        """The run's noise multiplier here (planned at its first private round); None: budget spent."""
        if self.cfg.privacy.noise_multiplier is not None:
            return self.cfg.privacy.noise_multiplier
        run = self.spec.run.run_uid
        if (plan := self.ledger.plan(run, self.site.name)) is not None:
            return plan["sigma"]
        remaining = self._remaining_plan()
        sigmas = [
            noise_for(self.budget.target_epsilon, self.budget.delta, spent, remaining)
            for spent in self.ledger.histories(self.patients)
        ]
        sigma = None if None in sigmas else max(sigmas)  # type: ignore[type-var]
        if sigma is not None:
            self.ledger.append(
                "plan",
                run_uid=run,
                site=self.site.name,
                run_name=self.cfg.name,
                sigma=sigma,
                planned=[list(m) for m in remaining],
                **self._budget_fields(),
            )
            log.info(
                "privacy: sigma %.3f keeps this run's %d steps within epsilon %g",
                sigma,
                sum(n for _, n in remaining),
                self.budget.target_epsilon,
            )
        return sigma

    def refusal(self) -> tuple[PrivateSGD | None, str | None]:
        """(the round's DP-SGD, None) or (None, why this round is refused)."""
        sigma = self.sigma()
        spent = self.epsilon
        target = self.budget.target_epsilon
        projected = None  # None: the budget is spent before the run's first round here
        if sigma is not None:
            mine = [(sigma, q, n) for q, n in self.round_plan(self.spec.phase, self.spec.round)]
            projected = self._after(mine)
            if projected <= target * (1 + 1e-9):
                return self._sgd(sigma), None
        over = (
            f"this round would reach {projected:.3f} >"
            if sigma is not None
            else "no noise keeps this run within"
        )
        reason = (
            f"privacy budget exhausted: epsilon {spent:.3f} spent, {over} the site's target {target:g} "
            f"(delta {self.budget.delta:g}, unit {self.cfg.privacy.unit})"
        )
        finite = projected if projected is not None and math.isfinite(projected) else None
        self.ledger.append("refused", **self._round_fields(), projected=finite, **self._budget_fields())
        return None, reason

    def release(self, sgd: PrivateSGD) -> float:
        """Record the round's steps (before its reply leaves); returns the site's epsilon after them."""
        after = self._after(list(sgd.released))
        self.ledger.append(
            "release",
            **self._round_fields(),
            mechanisms=[list(m) for m in sgd.released],
            epsilon=after,
            patients=self.ledger.cohort(self.patients),
            data=data_fingerprint(self.site.rows["image_id"]),
            **self._budget_fields(),
        )
        return after

    def _sgd(self, sigma: float) -> PrivateSGD:
        p = self.cfg.privacy
        batch = self.cfg.pretrain.batch_size if self.spec.phase == PRETRAIN else self.cfg.finetune.batch_size
        return PrivateSGD(sigma, p.clip, p.unit, batch, p.grad_sample_mode)

    def _remaining_plan(self) -> list[Mechanism]:
        """(q, steps) of every round from this one to the run's end (as (q, steps), sigma left out)."""
        f, spec = self.cfg.federation, self.spec
        phases = [(PRETRAIN, f.rounds_pretrain), (FINETUNE, f.rounds_finetune)]
        start = {PRETRAIN: 0, FINETUNE: 1}[spec.phase]
        plan: list = []
        for phase, rounds in phases[start:]:
            first = spec.round if phase == spec.phase else 1
            for rnd in range(first, rounds + 1):
                plan += self.round_plan(phase, rnd)
        return plan

    def _images(self, phase: str) -> tuple[dict[str, int], int]:
        """Images per task trained in `phase` here, and the phase's batch size (computed once per phase:
        planning a run asks for every one of its rounds)."""
        if phase not in self._sizes:
            self._sizes[phase] = self._count(phase)
        return self._sizes[phase]

    def _count(self, phase: str) -> tuple[dict[str, int], int]:
        if phase == PRETRAIN:
            return {"": len(self.site.rows)}, self.cfg.pretrain.batch_size
        wanted = tuple(self.spec.tasks) if self.spec.phase == FINETUNE else self.cfg.federation.tasks
        held = [t for t in labelled_counts(self.site.rows) if not wanted or t in wanted]
        train = {t: len(finetune_split(self.site.rows, t, self.cfg)[0]) for t in held}
        return train, self.cfg.finetune.batch_size

    def _round_fields(self) -> dict:
        spec = self.spec
        return {
            "site": self.site.name,
            "run_uid": spec.run.run_uid,
            "run_name": self.cfg.name,
            "phase": spec.phase,
            "round": spec.round,
        }

    def _budget_fields(self) -> dict:
        return {
            "unit": self.cfg.privacy.unit,
            "delta": self.budget.delta,
            "target_epsilon": self.budget.target_epsilon,
            "largest_patient": largest_patient(self.site.rows),
        }


def largest_patient(rows: pd.DataFrame) -> int:
    """The most images one patient has here: image-level epsilon protects a patient only k-fold weaker."""
    return int(rows.groupby("patient_id").size().max()) if len(rows) else 0


def ledger_report(config: SiteConfig) -> str:
    """`fedretina site privacy`: each ledger under the site's state folder (one per set of images: the
    site, or a simulation's parts of it), its releases grouped by run and phase, and the epsilon spent."""
    paths = sorted(config.privacy_dir.glob("*.jsonl"))
    budget = config.privacy
    lines = [f"site {config.name}: budget epsilon {budget.target_epsilon:g} at delta {budget.delta:g}"]
    if not paths:
        return "\n".join([*lines, f"no private training yet (no ledger in {config.privacy_dir})"])
    for path in paths:
        ledger = Ledger(path)
        entries = ledger.entries()
        lines += ["", f"ledger {path}", _table(entries)]
        named = ledger.patients()
        spent = ledger.epsilon(budget.delta, patients=named) if named else ledger.epsilon(budget.delta)
        units = sorted({e["unit"] for e in entries if "unit" in e})
        largest = max((e.get("largest_patient", 0) for e in entries), default=0)
        share = f"{100 * spent / budget.target_epsilon:.0f}%"
        refused = sum(e["kind"] == "refused" for e in entries)
        lines.append(
            f"epsilon spent (worst-off patient): {spent:.3f} of {budget.target_epsilon:g} ({share}) at delta "
            f"{budget.delta:g}; "
            f"privacy unit: {', '.join(units)}; refused rounds: {refused}"
        )
        if "image" in units and largest > 1:
            eps_k, delta_k = group_bound(spent, budget.delta, largest)
            lines.append(
                f"image-level epsilon: a patient with {largest} images here is protected at "
                f"epsilon {eps_k:.3f}, delta {delta_k:.2g} (group privacy)"
            )
    return "\n".join(lines)


def _table(entries: list[dict]) -> str:
    """Releases grouped by (run, phase, sigma, sample rate): rounds, steps and the epsilon after them."""
    groups: dict[tuple, dict] = {}
    for e in entries:
        if e["kind"] != "release":
            continue
        for sigma, q, steps in e["mechanisms"]:
            key = (e.get("run_name", e.get("model", "")), e.get("site", ""), e.get("phase", ""), sigma, q)
            g = groups.setdefault(key, {"rounds": [], "steps": 0})
            g["rounds"].append(e.get("round", 0))
            g["steps"] += steps
            g["epsilon"] = e["epsilon"]
    rows = [
        "| run | site | phase | rounds | steps | sigma | sample rate | epsilon after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (run, site, phase, sigma, q), g in groups.items():
        rounds = sorted(set(g["rounds"]))
        span = f"{rounds[0]}-{rounds[-1]}" if len(rounds) > 1 else str(rounds[0])
        rows.append(
            f"| {run} | {site} | {phase} | {span} | {g['steps']} | {sigma:.3f} | {q:.4f} "
            f"| {g['epsilon']:.3f} |"
        )
    return "\n".join(rows)
