"""How much of a synthetic eye each DR grade visibly changes, at the size the model sees it.

The same eye (same seeds, so the same vessels, texture and sensor noise) is rendered at grade g and at grade
0, both go through the training pipeline's crop-and-resize (`crop_to_fov`), and a pixel counts as changed when
a channel moves by more than `THRESHOLD` grey levels. Reported per grade: the fraction of FOV pixels changed
and the median equivalent diameter (px) of the changed regions. This is the table docs/data.md
quotes and the property the renderer's tests hold it to: a model can only learn what it can see."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from shared.data.fundus import crop_to_fov, find_fov
from shared.data.synth.render import CAMERA_STYLES, FundusSpec, render_fundus
from shared.seeding import derive_seed

THRESHOLD = 10  # grey levels out of 255: well above the JPEG-free render's rounding
STYLES = ("eyepacs-mixed-a", "eyepacs-mixed-b")  # the labelled DR site's cameras


@dataclass(frozen=True)
class Evidence:
    grade: int
    size: int
    changed: float  # mean fraction of FOV pixels changed
    diameter: float  # median equivalent diameter (px) of the changed regions; 0 when none


def grade_evidence(grade: int, size: int, eyes: int = 16, seed: int = 0) -> Evidence:
    """Evidence of `grade` over `eyes` eyes rendered at 1.5 x `size` rows (as the cpu profile renders
    192 px for 128), seen at `size` px."""
    fractions, diameters = [], []
    for k in range(eyes):
        spec = FundusSpec(
            derive_seed(seed, "evidence", k), derive_seed(seed, "eye", k), "left", dr_grade=grade
        )
        style = CAMERA_STYLES[STYLES[k % len(STYLES)]]
        height = round(1.5 * size)
        healthy = render_fundus(FundusSpec(spec.patient_seed, spec.eye_seed, "left"), style, height).image
        fov = find_fov(healthy)
        base, inside = crop_to_fov(healthy, fov, size)
        sick, _ = crop_to_fov(render_fundus(spec, style, height).image, fov, size)
        moved = (np.abs(sick.astype(np.int16) - base.astype(np.int16)).max(axis=2) > THRESHOLD) & inside
        fractions.append(moved.sum() / inside.sum())
        labels, n = ndimage.label(moved, structure=np.ones((3, 3)))
        areas = np.bincount(labels.ravel())[1:]
        diameters += (2 * np.sqrt(areas / np.pi)).tolist() if n else []
    return Evidence(grade, size, float(np.mean(fractions)), float(np.median(diameters)) if diameters else 0.0)


def evidence_table(sizes: tuple[int, ...] = (128, 224), eyes: int = 16) -> str:
    """The markdown table of every grade's evidence at each size."""
    head = "| DR grade | " + " | ".join(f"pixels changed @{s} | region diameter @{s} (px)" for s in sizes)
    lines = [head + " |", "|---|" + "---|---|" * len(sizes)]
    for grade in range(5):
        cells = []
        for size in sizes:
            e = grade_evidence(grade, size, eyes)
            cells += [f"{100 * e.changed:.2f}%", f"{e.diameter:.1f}"]
        lines.append(f"| {grade} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(evidence_table())
