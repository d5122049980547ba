"""Who the synthetic patients are: label distributions and the correlation between a person's two eyes.

Grades are drawn per patient (a latent severity) and then per eye (the fellow eye is usually within one
grade), as in screening populations. Distributions are flatter than the real ones (EyePACS is 73% grade 0)
so that small demo sites still hold every grade; the real proportions are kept in comments for reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.data.synth.render import FundusSpec
from shared.seeding import derive_seed

# Labelled DR sites: flatter than EyePACS train (73.5 / 7.0 / 15.1 / 2.5 / 2.0 %), so small sites hold
# every grade.
DR_WEIGHTS = (0.50, 0.14, 0.24, 0.06, 0.06)
# Unlabelled screening pools: EyePACS's own proportions (a diabetic screening programme).
SCREENING_DR_WEIGHTS = (0.735, 0.07, 0.151, 0.025, 0.02)
# UK Biobank-like volunteers: about 5% diabetic, about a third of them with some DR.
VOLUNTEER_DR_WEIGHTS = (0.95, 0.025, 0.018, 0.004, 0.003)
# MMAC train: 35.3 / 36.0 / 19.6 / 5.2 / 3.8 %.
MM_WEIGHTS = (0.28, 0.30, 0.20, 0.12, 0.10)
NEURO_PREVALENCE = 0.5  # case-control design, as the seed's matched AD / PD cohorts


@dataclass(frozen=True)
class Person:
    pid: str
    seed: int
    dr: tuple[int, int]  # left, right
    mm: tuple[int, int]
    neuro: bool

    def spec(self, eye: str, visit: int = 0) -> FundusSpec:
        k = 0 if eye == "left" else 1
        return FundusSpec(
            patient_seed=self.seed,
            eye_seed=derive_seed(self.seed, eye, visit),
            eye=eye,  # type: ignore[arg-type]
            dr_grade=self.dr[k],
            mm_grade=self.mm[k],
            neuro=self.neuro,
        )


def people(
    n: int,
    seed: int,
    *,
    dr: tuple[float, ...] | None = None,
    mm: bool = False,
    neuro: bool = False,
    first_id: int = 1,
) -> list[Person]:
    """`n` persons with ids first_id.. and, where asked, DR grades (drawn with the grade weights `dr`),
    myopic grades and a neuro case flag."""
    rng = np.random.default_rng(derive_seed(seed, "people"))
    out = []
    for i in range(n):
        pid = str(first_id + i)
        grades_dr = _eye_pair(rng, dr) if dr else (0, 0)
        grades_mm = _eye_pair(rng, MM_WEIGHTS) if mm else (0, 0)
        case = bool(neuro and rng.random() < NEURO_PREVALENCE)
        out.append(Person(pid, derive_seed(seed, "person", pid), grades_dr, grades_mm, case))
    return out


def _eye_pair(rng: np.random.Generator, weights: tuple[float, ...]) -> tuple[int, int]:
    """A latent grade for the person; each eye equals it or (30%) differs by one, kept in range."""
    base = int(rng.choice(len(weights), p=np.asarray(weights) / sum(weights)))
    eyes = []
    for _ in range(2):
        shift = int(rng.choice((-1, 0, 1), p=(0.15, 0.7, 0.15)))
        eyes.append(min(max(base + shift, 0), len(weights) - 1))
    return eyes[0], eyes[1]
