"""What screening photographs hold besides DR that looks like DR: drusen, pigment clumps and lens dust.

Every eye, whatever its grade, gets them from its own generator, so a grade-0 eye can show pale yellow
dots (drusen, exudate-like), dark brown spots (pigment clumps, microaneurysm-like) and soft dark disks
(dust on the camera's optics, out of focus, haemorrhage-like), as many as chance gives each eye. They make
"is there a dark or pale spot?" a poor referable-DR rule: what sets DR apart is the lesions' colour,
sharpness and where they gather (clusters round leaking capillaries, rings of exudates), which a model has
to learn from the images, not from a global colour shift.
"""

from __future__ import annotations

import numpy as np

from shared.data.synth.anatomy import Layout
from shared.data.synth.raster import Canvas, Layer

_DRUSEN = (0.98, 0.86, 0.55)  # soft, pale yellow deposits under the RPE
_PIGMENT = (0.35, 0.62, 0.66)  # absorption of a brown-black pigment clump
_DUST = (0.3, 0.32, 0.32)  # absorption of an out-of-focus dust shadow: grey, not red


def paint_mimics(img: np.ndarray, canvas: Canvas, layout: Layout, rng: np.random.Generator) -> None:
    """Paint drusen, pigment clumps and dust shadows on the planar image (none of them is a DR lesion)."""
    drusen_rate = rng.choice((0.0, 4.0, 14.0), p=(0.45, 0.35, 0.2))  # none / some / many, per eye
    drusen = Layer(canvas)
    for p in _scatter(rng, layout, int(rng.poisson(drusen_rate)), (0.05, 0.5)):
        drusen.dot(p, rng.uniform(0.01, 0.022), opacity=rng.uniform(0.5, 1.0))
    drusen.patch(blur=0.008, min_px=0.7).tint(img, _DRUSEN, opacity=0.55)
    pigment = Layer(canvas)
    for p in _scatter(rng, layout, int(rng.poisson(2.0)), (0.1, 0.85)):
        pigment.dot(p, rng.uniform(0.01, 0.02), opacity=rng.uniform(0.5, 1.0))
    pigment.patch(min_px=0.6).darken(img, _PIGMENT)
    dust = Layer(canvas)
    for p in _scatter(rng, layout, int(rng.poisson(1.5)), (0.0, 0.9)):
        dust.dot(p, rng.uniform(0.025, 0.05))
    dust.patch(blur=0.02, min_px=1.0).darken(img, tuple(rng.uniform(0.25, 0.6) * a for a in _DUST))


def _scatter(rng: np.random.Generator, layout: Layout, n: int, reach: tuple[float, float]) -> np.ndarray:
    """(up to n, 2) positions spread evenly at `reach` FOV radii from the fovea, inside the FOV, off the
    disc: unlike DR lesions, mimics follow no per-eye cluster."""
    if n == 0:
        return np.zeros((0, 2))
    tries = 4 * n + 8
    angle = rng.uniform(0.0, 2 * np.pi, tries)
    dist = np.sqrt(rng.uniform(reach[0] ** 2, reach[1] ** 2, tries))
    pts = np.asarray(layout.fovea) + dist[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    off_disc = np.hypot(*(pts - np.asarray(layout.disc)).T) > 1.4 * layout.disc_radii[1]
    return pts[(np.hypot(*pts.T) < 0.92) & off_disc][:n]
