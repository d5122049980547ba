"""How much of a synthetic eye each label visibly changes, at the size the model sees it.

Pixels: the same eye (same seeds, so the same vessels, texture and sensor noise) is rendered with the sign
and without it, both go through the training pipeline's crop-and-resize (`crop_to_fov`), and a pixel counts
as changed when a channel moves by more than `THRESHOLD` grey levels. Reported per sign and level: the
fraction of FOV pixels changed and the median equivalent diameter (px) of the changed regions. Signs: `dr`
(ICDR grade, the EyePACS-like cameras), `mm` (META-PM myopic maculopathy grade, the MMAC-like camera) and
`neuro` (the AD/PD-like vascular change, the UK Biobank-like camera).

Vessels: the neuro sign changes the vessel tree, not lesions, so its evidence is also read from the tree the
renderer grows (`render.eye_anatomy`): the widest venules' and arterioles' calibre (px at the model's size,
as CRVE/CRAE take the six widest), their ratio, tortuosity (arc over chord, minus 1) and how many branches
are drawn, for the same patients with and without the sign, with the standardised difference (Cohen's d
against the controls' spread between patients): what a model could learn from a group, and why one image
does not show it. This is the table docs/data.md quotes and the property the renderer's tests hold it to:
a model can only learn what it can see."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from scipy import ndimage

from shared.data.fundus import crop_to_fov, find_fov
from shared.data.synth.render import CAMERA_STYLES, FundusSpec, eye_anatomy, render_fundus
from shared.data.synth.vessels import drawn
from shared.seeding import derive_seed

THRESHOLD = 10  # grey levels out of 255: well above the JPEG-free render's rounding
Sign = Literal["dr", "mm", "neuro"]
STYLES: dict[Sign, tuple[str, ...]] = {  # each label's own site cameras
    "dr": ("eyepacs-mixed-a", "eyepacs-mixed-b"),
    "mm": ("mmac",),
    "neuro": ("topcon",),
}
LEVELS: dict[Sign, range] = {"dr": range(5), "mm": range(5), "neuro": range(2)}
_WIDEST = 6  # vessels per kind in the calibre summary, as CRAE / CRVE


@dataclass(frozen=True)
class Evidence:
    sign: Sign
    level: int
    size: int
    changed: float  # mean fraction of FOV pixels changed
    diameter: float  # median equivalent diameter (px) of the changed regions; 0 when none


def _spec(sign: Sign, level: int, k: int, seed: int) -> FundusSpec:
    healthy = FundusSpec(derive_seed(seed, "evidence", k), derive_seed(seed, "eye", k), "left")
    field = {"dr": "dr_grade", "mm": "mm_grade", "neuro": "neuro"}[sign]
    return replace(healthy, **{field: bool(level) if sign == "neuro" else level})


def sign_evidence(
    sign: Sign, level: int, size: int, eyes: int = 16, seed: int = 0, versus: int = 0
) -> Evidence:
    """Evidence of `sign` at `level` against the same eyes at level `versus` (0: without the sign), over
    `eyes` eyes rendered at 1.5 x `size` rows (as the cpu profile renders 192 px for 128), seen at `size`
    px."""
    fractions, diameters = [], []
    for k in range(eyes):
        spec = _spec(sign, level, k, seed)
        styles = STYLES[sign]
        style = CAMERA_STYLES[styles[k % len(styles)]]
        height = round(1.5 * size)
        healthy = render_fundus(_spec(sign, versus, k, seed), style, height).image
        fov = find_fov(healthy)
        base, inside = crop_to_fov(healthy, fov, size)
        sick, _ = crop_to_fov(render_fundus(spec, style, height).image, fov, size)
        moved = (np.abs(sick.astype(np.int16) - base.astype(np.int16)).max(axis=2) > THRESHOLD) & inside
        fractions.append(moved.sum() / inside.sum())
        labels, n = ndimage.label(moved, structure=np.ones((3, 3)))
        areas = np.bincount(labels.ravel())[1:]
        diameters += (2 * np.sqrt(areas / np.pi)).tolist() if n else []
    median = float(np.median(diameters)) if diameters else 0.0
    return Evidence(sign, level, size, float(np.mean(fractions)), median)


@dataclass(frozen=True)
class VesselStats:
    """Per eye: the widest drawn venules' and arterioles' mean calibre (px at the model's size), their
    ratio, the drawn branches' mean tortuosity (arc / chord - 1) and how many branches are drawn."""

    vein_px: float
    artery_px: float
    av_ratio: float
    tortuosity: float
    branches: int


def vessel_stats(spec: FundusSpec, size: int) -> VesselStats:
    """The vessel tree of `spec` as rendered at 1.5 x `size` rows, measured at `size` px (the FOV's radius
    is half the model's input)."""
    canvas, _, _, vasc, tree = eye_anatomy(spec, CAMERA_STYLES[STYLES["neuro"][0]], round(1.5 * size))
    shown = [b for b, keep in zip(tree, drawn(tree, vasc, canvas.r), strict=True) if keep]
    px = size / 2

    def calibre(vein: bool) -> float:
        gain = vasc.vein_gain if vein else vasc.artery_gain
        widths = sorted((float(b.width[0]) * gain * px for b in shown if b.vein == vein), reverse=True)
        return float(np.mean(widths[:_WIDEST]))

    bends = []
    for b in shown:
        if len(b.pts) >= 10:
            arc = float(np.linalg.norm(np.diff(b.pts, axis=0), axis=1).sum())
            bends.append(arc / float(np.linalg.norm(b.pts[-1] - b.pts[0])) - 1)
    vein, artery = calibre(True), calibre(False)
    return VesselStats(vein, artery, artery / vein, float(np.mean(bends)), len(shown))


def neuro_vessel_table(
    size: int = 128, eyes: int = 32, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """Per statistic: (controls' mean, cases' mean, Cohen's d), the same `eyes` patients with and without
    the sign, d against the controls' spread between patients."""
    control = [vessel_stats(_spec("neuro", 0, k, seed), size) for k in range(eyes)]
    case = [vessel_stats(_spec("neuro", 1, k, seed), size) for k in range(eyes)]
    table = {}
    for key in VesselStats.__dataclass_fields__:
        a = np.array([getattr(s, key) for s in control], float)
        b = np.array([getattr(s, key) for s in case], float)
        table[key] = (float(a.mean()), float(b.mean()), float((b.mean() - a.mean()) / a.std(ddof=1)))
    return table


def evidence_table(
    sign: Sign = "dr", sizes: tuple[int, ...] = (128, 224), eyes: int = 16, step: bool = False
) -> str:
    """The markdown table of every level's pixel evidence at each size, against level 0 or (`step`)
    against the level below (what tells neighbouring grades apart)."""
    versus = "the grade below" if step else "0"
    head = f"| {sign} level (vs {versus}) | " + " | ".join(
        f"pixels changed @{s} | region diameter @{s} (px)" for s in sizes
    )
    lines = [head + " |", "|---|" + "---|---|" * len(sizes)]
    for level in LEVELS[sign][1:] if step else LEVELS[sign]:
        cells = []
        for size in sizes:
            e = sign_evidence(sign, level, size, eyes, versus=level - 1 if step else 0)
            cells += [f"{100 * e.changed:.2f}%", f"{e.diameter:.1f}"]
        lines.append(f"| {level} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def vessel_table(size: int = 128, eyes: int = 32) -> str:
    """The markdown table of the neuro sign's vessel statistics."""
    lines = [
        f"| vessels @{size} ({eyes} patients, paired) | controls | AD/PD-like | Cohen's d |",
        "|---|---|---|---|",
    ]
    for key, (control, case, d) in neuro_vessel_table(size, eyes).items():
        lines.append(f"| {key} | {control:.3f} | {case:.3f} | {d:+.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for sign in LEVELS:
        print(evidence_table(sign))
    print(evidence_table("mm", step=True))
    print(vessel_table())
