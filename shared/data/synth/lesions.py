"""Diabetic retinopathy lesions, each drawn on its own layer so its mask is exactly what was painted.

The burden follows the ICDR scale: 1 a few microaneurysms; 2 plus some haemorrhages and/or exudates;
3 haemorrhages in all quadrants, venous beading and cotton-wool spots; 4 neovascularisation on top of grade-3
signs. Counts are drawn from overlapping ranges, so neighbouring grades overlap at the borders as real
grading does.

Where: microaneurysms, blot haemorrhages and hard exudates fall in an eye's `Density`, a few smooth clusters
(the leaking capillary beds of real DR), each wider than half a SparK mask patch, so the lesions of a masked
patch show in its visible neighbours and context predicts them. How big: sizes are fractions of the FOV
radius chosen so that grade-2+ evidence spans at least 2 px at the cpu profile's 128 px
(docs/data.md has the measured table; `shared/data/synth/evidence.py` measures it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.data.synth.anatomy import Layout
from shared.data.synth.raster import Canvas, Layer, blob_points, ellipse_points
from shared.data.synth.vessels import Branch, trace, wiggle

LESIONS = ("ma", "he", "ex", "se", "nv")
_BLOOD = (0.26, 0.64, 0.6)  # absorption of a microaneurysm or an intraretinal haemorrhage
_DEEP_BLOOD = (0.45, 0.85, 0.8)  # preretinal haemorrhage: a thick pool
_NEW_VESSEL = (0.06, 0.5, 0.42)
_EXUDATE = (1.0, 0.9, 0.5)
_COTTON = (0.95, 0.9, 0.8)


@dataclass(frozen=True)
class _Burden:
    """Inclusive count ranges per lesion kind, and probabilities of the grade-defining signs."""

    ma: tuple[int, int] = (0, 0)
    blot: tuple[int, int] = (0, 0)
    flame: tuple[int, int] = (0, 0)
    exudate_clusters: tuple[int, int] = (0, 0)
    cotton: tuple[int, int] = (0, 0)
    beaded_veins: tuple[int, int] = (0, 0)
    preretinal: float = 0.0


_BURDEN = {
    0: _Burden(),
    1: _Burden(ma=(1, 6)),
    2: _Burden(ma=(3, 14), blot=(0, 5), flame=(0, 1), exudate_clusters=(0, 1), cotton=(0, 1)),
    3: _Burden(
        ma=(8, 24), blot=(6, 18), flame=(1, 4), exudate_clusters=(0, 2), cotton=(1, 4), beaded_veins=(1, 3)
    ),
    4: _Burden(
        ma=(6, 22),
        blot=(5, 16),
        flame=(1, 4),
        exudate_clusters=(0, 2),
        cotton=(1, 4),
        beaded_veins=(0, 3),
        preretinal=0.35,
    ),
}


def _count(rng: np.random.Generator, span: tuple[int, int]) -> int:
    return int(rng.integers(span[0], span[1] + 1))


def _spots(
    rng: np.random.Generator,
    layout: Layout,
    n: int,
    reach: tuple[float, float],
    around: tuple[float, float] | None = None,
) -> np.ndarray:
    """(n, 2) positions at distance `reach` from `around` (default: the fovea), inside the FOV, off the disc.

    Consecutive candidates go once round the centre, so the positions cover every quadrant.
    """
    centre = np.asarray(layout.fovea if around is None else around)
    tries = 4 * n + 8
    angles = (np.arange(tries) + rng.random(tries)) * (2 * np.pi / max(1, n))
    dist = np.sqrt(rng.uniform(reach[0] ** 2, reach[1] ** 2, tries))
    pts = centre + dist[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    off_disc = np.hypot(*(pts - np.asarray(layout.disc)).T) > 1.4 * layout.disc_radii[1]
    ok = pts[(np.hypot(*pts.T) < 0.9) & off_disc]
    return ok[:n]


@dataclass(frozen=True)
class Density:
    """An eye's lesion density: a mixture of isotropic Gaussians (centres and spreads in FOV radii)."""

    centres: np.ndarray  # (K, 2)
    spreads: np.ndarray  # (K,)

    def sample(self, rng: np.random.Generator, layout: Layout, n: int) -> np.ndarray:
        """(n, 2) positions drawn from the mixture, inside the FOV and off the disc."""
        if n == 0 or not len(self.centres):
            return np.zeros((0, 2))
        tries = 4 * n + 8
        k = rng.integers(len(self.centres), size=tries)
        pts = self.centres[k] + self.spreads[k, None] * rng.standard_normal((tries, 2))
        off_disc = np.hypot(*(pts - np.asarray(layout.disc)).T) > 1.4 * layout.disc_radii[1]
        return pts[(np.hypot(*pts.T) < 0.9) & off_disc][:n]


_CLUSTERS = {0: (0, 0), 1: (1, 1), 2: (1, 2), 3: (2, 4), 4: (2, 4)}  # inclusive range per grade


def lesion_density(rng: np.random.Generator, layout: Layout, grade: int) -> Density:
    """Clusters round the macula, one per sector of a circle (so grade 3's cover every quadrant), each with
    a spread of 0.12-0.2 FOV radii: wider than half a mask patch (0.25 FOV radii across at 128 px)."""
    k = _count(rng, _CLUSTERS[grade])
    angles = (np.arange(k) + rng.uniform(0.1, 0.9, k)) * (2 * np.pi / max(k, 1)) + rng.uniform(0, 2 * np.pi)
    dist = rng.uniform(0.15, 0.55, k)
    centres = np.asarray(layout.fovea) + dist[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return Density(centres, rng.uniform(0.12, 0.2, k))


def venous_beading(tree: list[Branch], grade: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """Stretches (branch, first point, last point) of wide veins to draw beaded."""
    wide = [i for i, b in enumerate(tree) if b.vein and b.width[0] > 0.01 and len(b.pts) > 30]
    chosen = rng.permutation(wide)[: _count(rng, _BURDEN[grade].beaded_veins)]
    beads = []
    for i in chosen.tolist():
        first = int(rng.integers(5, len(tree[i].pts) - 25))
        beads.append((i, first, first + int(rng.integers(15, 25))))
    return beads


def _haemorrhages(
    layer: Layer, rng: np.random.Generator, layout: Layout, burden: _Burden, density: Density
) -> None:
    """Dot and blot haemorrhages in the eye's clusters, flame haemorrhages along the nerve fibres."""
    for p in density.sample(rng, layout, _count(rng, burden.blot)):
        for _ in range(int(rng.integers(1, 4))):
            centre = p + rng.normal(0.0, 0.015, 2)
            outline = blob_points(rng, centre, rng.uniform(0.018, 0.035), 0.2)
            layer.polygon(outline, opacity=rng.uniform(0.35, 0.75))
    disc = np.asarray(layout.disc)
    reach = (2.0 * layout.disc_radii[1], 6.0 * layout.disc_radii[1])
    for p in _spots(rng, layout, _count(rng, burden.flame), reach, around=layout.disc):
        along = float(np.arctan2(*(p - disc)[::-1])) + rng.normal(0.0, 0.2)  # fibres run away from the disc
        radii = (rng.uniform(0.05, 0.09), rng.uniform(0.014, 0.022))
        layer.polygon(ellipse_points(p, radii, along), opacity=rng.uniform(0.75, 0.95))


def _exudates(
    layer: Layer, rng: np.random.Generator, layout: Layout, clusters: int, density: Density
) -> None:
    """Hard exudates round the eye's leaking clusters: circinate rings (0.1-0.2 FOV radii across, wider
    than half a mask patch) or irregular plaques of sharp yellow deposits."""
    for centre in density.sample(rng, layout, clusters):
        n = int(rng.integers(6, 24))
        if rng.random() < 0.5:  # circinate: a broken ring round a leaking centre
            ring, arc = rng.uniform(0.1, 0.2), rng.uniform(0.4, 1.0) * 2 * np.pi
            t = rng.uniform(0.0, 2 * np.pi) + np.sort(rng.uniform(0.0, arc, n))
            pts = centre + (ring * rng.normal(1.0, 0.1, n))[:, None] * np.stack([np.cos(t), np.sin(t)], 1)
        else:
            pts = centre + rng.normal(0.0, 0.05, (n, 2))
        for p, radius in zip(pts, 0.009 * rng.lognormal(0.0, 0.4, n), strict=True):
            layer.dot(p, radius)


def _cotton_wool(layer: Layer, rng: np.random.Generator, layout: Layout, count: int) -> None:
    """Fluffy pale patches near the disc and along the arcades."""
    reach = (2.0 * layout.disc_radii[1], 5.5 * layout.disc_radii[1])
    for p in _spots(rng, layout, count, reach, around=layout.disc):
        for _ in range(int(rng.integers(2, 4))):
            layer.polygon(blob_points(rng, p + rng.normal(0.0, 0.02, 2), rng.uniform(0.03, 0.05), 0.25))


def _new_vessels(layer: Layer, rng: np.random.Generator, layout: Layout, tree: list[Branch]) -> None:
    """Fine tangled loops on the disc (NVD) and/or on the arcade veins (NVE)."""
    arcades = [b for b in tree if b.vein and b.parent < 0 and len(b.pts) > 40]
    sites = []
    if rng.random() < 0.6 or not arcades:
        sites.append(np.asarray(layout.disc) + rng.normal(0.0, 0.3 * layout.disc_radii[1], 2))
    for _ in range(int(rng.integers(0 if sites else 1, 3)) if arcades else 0):
        veins = arcades[int(rng.integers(len(arcades)))].pts
        sites.append(veins[int(rng.integers(15, len(veins) - 10))])
    width = max(0.004, 1.2 / layer.canvas.r)
    for site in sites:
        for _ in range(int(rng.integers(8, 16))):
            n = int(rng.integers(6, 14))
            bend = rng.choice([-1.0, 1.0]) * rng.uniform(10.0, 25.0)
            pts, _ = trace(
                tuple(site + rng.normal(0.0, 0.02, 2)), rng.uniform(0, 2 * np.pi), bend + wiggle(rng, n, 60.0)
            )
            layer.tapered(pts, np.full(n, width))


def _preretinal(layer: Layer, rng: np.random.Generator, layout: Layout) -> None:
    """A boat-shaped pool of blood under the disc or along the inferior arcade, flat on top (it settles)."""
    for centre in _spots(rng, layout, 1, (0.25, 0.55), around=layout.disc):
        centre[1] = abs(centre[1] - layout.disc[1]) + layout.disc[1]  # below the disc
        radius = rng.uniform(0.05, 0.1)
        pts = ellipse_points(centre, (radius * rng.uniform(1.0, 1.4), radius), 0.0, n=32)
        pts[:, 1] = np.maximum(pts[:, 1], centre[1] - 0.3 * radius)
        layer.polygon(pts)


def paint_lesions(
    img: np.ndarray, canvas: Canvas, layout: Layout, tree: list[Branch], grade: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Paint the lesions of an ICDR `grade` eye; returns one (H, W) bool mask per kind in `LESIONS`."""
    burden = _BURDEN[grade]
    density = lesion_density(rng, layout, grade)
    layers = {key: Layer(canvas) for key in LESIONS}
    for p in density.sample(rng, layout, _count(rng, burden.ma)):
        layers["ma"].dot(p, rng.uniform(0.012, 0.02), opacity=rng.uniform(0.45, 0.9))
    _haemorrhages(layers["he"], rng, layout, burden, density)
    clusters = _count(rng, burden.exudate_clusters)
    if grade == 2 and clusters == 0 and not layers["he"].image.getbbox():
        clusters = 1  # grade 2 needs more than microaneurysms
    _exudates(layers["ex"], rng, layout, clusters, density)
    _cotton_wool(layers["se"], rng, layout, _count(rng, burden.cotton))
    if grade == 4:
        _new_vessels(layers["nv"], rng, layout, tree)
    preretinal = Layer(canvas)
    if rng.random() < burden.preretinal:
        _preretinal(preretinal, rng, layout)

    soft = 0.6
    layers["he"].patch(blur=0.004, min_px=soft).darken(img, _BLOOD)
    layers["ma"].patch(min_px=soft).darken(img, _BLOOD)
    layers["ex"].patch(min_px=0.4).tint(img, _EXUDATE, opacity=0.6)
    layers["se"].patch(blur=0.012, min_px=soft).tint(img, _COTTON, opacity=0.45)
    layers["nv"].patch(blur=0.015).tint(img, _COTTON, opacity=0.25)  # fibrous veil around new vessels
    layers["nv"].patch(min_px=0.5).darken(img, _NEW_VESSEL)
    preretinal.patch(min_px=soft).darken(img, _DEEP_BLOOD)
    masks = {key: layer.mask() for key, layer in layers.items()}
    masks["he"] |= preretinal.mask()
    return masks
