"""Label semantics in one place: the tasks a manifest can carry, their classes, and the referable-DR view.

Every label column of a manifest is `label_<task>` (nullable integer, NA = not labelled for that task), and a
value outside `range(task.num_classes)` is a data problem, never a silent clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[str, ...]
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def column(self) -> str:
        return label_column(self.name)


DR = Task(
    "dr",
    ("no DR", "mild NPDR", "moderate NPDR", "severe NPDR", "proliferative DR"),
    "diabetic retinopathy, ICDR grades 0-4",
)
DME = Task(
    "dme", ("no DME", "DME risk 1", "DME risk 2"), "diabetic macular oedema risk (IDRiD 0-2; Messidor-2 0/1)"
)
MMAC = Task(
    "mmac",
    (
        "no myopic maculopathy",
        "tessellated fundus",
        "diffuse chorioretinal atrophy",
        "patchy chorioretinal atrophy",
        "macular atrophy",
    ),
    "myopic maculopathy, META-PM categories 0-4 (MMAC 2023 task 1)",
)
AD = Task(
    "ad", ("control", "Alzheimer's disease"), "Alzheimer's disease case vs control (UK Biobank outcomes)"
)
PD = Task(
    "pd", ("control", "Parkinson's disease"), "Parkinson's disease case vs control (UK Biobank outcomes)"
)

TASKS: dict[str, Task] = {t.name: t for t in (DR, DME, MMAC, AD, PD)}

# Referable DR: Gulshan et al. / Voets et al. use grade >= 2 (our default); the second seed paper
# (Srinivasan et al. 2022) uses grades 3-4. The threshold is always a parameter
# (`finetune.referable_threshold`).
REFERABLE_THRESHOLD_GULSHAN = 2


def label_column(task: str) -> str:
    return f"label_{task}"


def generic_task(name: str, num_classes: int) -> Task:
    """A k-class task from any manifest column (the `folder` format), with classes named by index."""
    return Task(name, tuple(str(i) for i in range(num_classes)), f"{num_classes}-class task '{name}'")


def referable(grades: np.ndarray, threshold: int = REFERABLE_THRESHOLD_GULSHAN) -> np.ndarray:
    """Binary referable-DR labels from ICDR grades: 1 where grade >= threshold."""
    return (np.asarray(grades) >= threshold).astype(np.int64)


def referable_probability(probs: np.ndarray, threshold: int = REFERABLE_THRESHOLD_GULSHAN) -> np.ndarray:
    """P(referable) from 5-grade probabilities (N, 5): the sum of the referable grades' probabilities."""
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] != DR.num_classes:
        raise ValueError(f"expected (N, {DR.num_classes}) DR grade probabilities, got {probs.shape}")
    return probs[:, threshold:].sum(axis=1)


def referable_logit_probability(
    logits: np.ndarray, threshold: int = REFERABLE_THRESHOLD_GULSHAN
) -> np.ndarray:
    """P(referable) the second seed's way (Srinivasan et al. 2022): sum the referable grades' logits and the
    others' logits, then a softmax over the two sums, i.e. sigmoid(sum referable - sum non-referable).
    Unlike `referable_probability` it weighs every grade's logit alike, whatever the softmax made of it."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != DR.num_classes:
        raise ValueError(f"expected (N, {DR.num_classes}) DR grade logits, got {logits.shape}")
    margin = logits[:, threshold:].sum(axis=1) - logits[:, :threshold].sum(axis=1)
    return expit(margin)  # the logistic function, accurate in both tails
