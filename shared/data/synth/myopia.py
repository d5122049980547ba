"""Myopic maculopathy by META-PM category, painted under the retinal vessels.

0 normal; 1 tessellated fundus (large choroidal vessels show through a thin RPE as orange stripes with dark
brownish gaps); 2 diffuse chorioretinal atrophy (ill-defined yellowish-white area around disc and macula);
3 patchy chorioretinal atrophy (well-defined greyish-white patches with pigment clumps); 4 macular atrophy
(a large round whitish patch at the fovea). Every myopic eye also gets a temporal peripapillary atrophy
crescent; the oval tilted disc, paler fundus and straighter vessels come from `anatomy` and `vessels`.
"""

from __future__ import annotations

import numpy as np

from shared.data.synth.anatomy import Layout
from shared.data.synth.raster import Canvas, Layer, Patch, blob_points, ellipse_points, retina_noise
from shared.data.synth.vessels import STEP, trace, wiggle

_GAPS = (0.4, 0.32, 0.26)  # absorption of the pigmented spaces between choroidal vessels
_DIFFUSE = (0.95, 0.8, 0.6)
_BARE_SCLERA = (0.92, 0.87, 0.78)
_CHOROID_VESSEL = (0.88, 0.45, 0.3)
_PIGMENT = (0.55, 0.6, 0.6)
_PPA_WIDTH = (0.0, 0.35, 0.6, 0.9, 1.2)  # crescent width in disc radii by grade


def _choroid(canvas: Canvas, rng: np.random.Generator, pole: np.ndarray) -> np.ndarray:
    """Opacity of the large choroidal vessels, (H, W) float32: wavy bands running out from the pole."""
    layer = Layer(canvas)
    for _ in range(64):
        start = pole + rng.normal(0.0, 0.3, 2)
        outward = float(np.arctan2(*(start - pole)[::-1])) + rng.normal(0.0, 0.6)
        n = int(rng.uniform(0.4, 1.0) / STEP)
        pts, _ = trace(tuple(start), outward, wiggle(rng, n, 7.0))
        layer.tapered(pts, np.linspace(1.0, 1.7, n) * rng.uniform(0.014, 0.028))
    patch = layer.patch(blur=0.009, min_px=0.6)
    full = np.zeros((canvas.height, canvas.width), np.float32)
    full[patch.box] = patch.alpha
    return full


def _pole_weight(canvas: Canvas, pole: np.ndarray, sigma: float) -> np.ndarray:
    u, v = canvas.grid()
    du, dv = u - np.float32(pole[0]), v - np.float32(pole[1])
    return np.exp(-(du * du) / np.float32(2 * sigma**2)) * np.exp(-(dv * dv) / np.float32(2 * sigma**2))


def _atrophy(
    img: np.ndarray, layer: Layer, choroid: np.ndarray, rng: np.random.Generator, rims: list[np.ndarray]
) -> None:
    """Well-defined bare patches: white sclera crossed by choroidal vessels, pigment clumps at the rim."""
    patch = layer.patch(blur=0.005, min_px=0.7)
    patch.tint(img, _BARE_SCLERA, opacity=0.8)
    Patch(patch.box, patch.alpha * choroid[patch.box]).tint(img, _CHOROID_VESSEL, opacity=0.7)
    clumps = Layer(layer.canvas)
    for rim in rims:
        for p in rim[rng.random(len(rim)) < 0.15]:
            centre = p + rng.normal(0.0, 0.01, 2)
            clumps.polygon(blob_points(rng, centre, rng.uniform(0.004, 0.012), 0.4, n=8))
    clumps.patch(min_px=0.7).darken(img, _PIGMENT)


def paint_myopia(
    img: np.ndarray, canvas: Canvas, layout: Layout, grade: int, rng: np.random.Generator
) -> None:
    """Paint META-PM `grade` signs onto the background (before the disc and the vessels)."""
    if grade == 0:
        return
    fovea, disc = np.asarray(layout.fovea), np.asarray(layout.disc)
    pole = 0.6 * fovea + 0.4 * disc
    choroid = _choroid(canvas, rng, pole)
    strength = rng.uniform(0.45, 0.75) if grade == 1 else rng.uniform(0.7, 0.95)
    everywhere = (slice(None), slice(None))
    Patch(everywhere, (1.0 - choroid) * _pole_weight(canvas, pole, 0.75) * strength).darken(img, _GAPS)
    if grade >= 2:
        spread = _pole_weight(canvas, pole, 0.3) + 0.8 * _pole_weight(canvas, disc, 0.16)
        mottled = np.clip(spread * (0.75 + 0.3 * retina_noise(rng, canvas, 9)), 0.0, 1.0)
        Patch(everywhere, mottled).tint(img, _DIFFUSE, opacity=rng.uniform(0.4, 0.6))
    rims = []
    for _ in range(int(rng.integers(1, 5)) if grade == 3 else int(rng.integers(0, 3)) if grade == 4 else 0):
        angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.45)
        centre = fovea + dist * np.array([np.cos(angle), np.sin(angle)])
        rims.append(blob_points(rng, centre, rng.uniform(0.035, 0.09), 0.3))
    if grade == 4:
        rims.append(blob_points(rng, fovea + rng.normal(0.0, 0.02, 2), rng.uniform(0.14, 0.24), 0.1, n=32))
    bare = Layer(canvas)
    for rim in rims:
        bare.polygon(rim)
    # the crescent is bare sclera too; the disc, painted next, covers its inner part
    width, (rx, ry) = _PPA_WIDTH[grade] * rng.uniform(0.8, 1.2), layout.disc_radii
    shifted = disc + np.array([0.7 * width * rx, 0.0])
    bare.polygon(ellipse_points(shifted, (rx * (1 + width), ry * 1.05), layout.disc_tilt, n=32))
    _atrophy(img, bare, choroid, rng, rims)
