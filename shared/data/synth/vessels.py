"""The retinal vessel tree: arcades and nasal branches grown from the disc, branching by Murray's law.

A branch is a smooth random walk: its heading integrates a deterministic bend (the arcades curve around the
macula) plus smoothed curvature noise scaled by the patient's tortuosity. At each branch point the parent's
width drops so that w0^3 = w1^3 + w2^3 (Murray) and both daughters turn by Murray's optimal angles.

Every branch draws from its own generator keyed by its place in the tree, so changing a global factor (the
neuro tortuosity, pruning fine branches) moves vessels a little but never reshuffles the rest of the tree.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from shared.data.synth.anatomy import Layout, Traits
from shared.data.synth.raster import Canvas, Layer

STEP = 0.012  # path resolution, FOV radii
_FAZ = 0.07  # foveal avascular zone radius: vessels stop at its edge
_W_MIN = 0.0045  # no branch thinner than this (nominal) is grown, nor one under _MIN_PX pixels
_MIN_PX = 0.8
_FINE = 1.5  # branches within this factor of the finest grown may be pruned (the neuro sign)
_VEIN_ABSORB = (0.2, 0.58, 0.48)
_ARTERY_ABSORB = (0.07, 0.36, 0.3)
_MAX_DAUGHTERS = 12
_SMOOTH = np.array([1.0, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0]) / 16.0  # curvature noise kernel


@dataclass(frozen=True)
class Vasculature:
    """Global vessel factors of one eye: patient baseline times disease effects."""

    artery_gain: float
    vein_gain: float
    tortuosity: float
    bend: float  # scales the arcades' curvature (myopic eyes: straighter)
    fine_keep: float  # fraction of the finest branches that are drawn


def vasculature(traits: Traits, neuro: bool, mm_grade: int) -> Vasculature:
    """Neuro: wider venules, narrower arterioles, more tortuous, sparser; myopia: straighter and thinner."""
    vein, artery, tort, keep = (1.12, 0.92, 1.3, 0.8) if neuro else (1.0, 1.0, 1.0, 1.0)
    myopic = mm_grade >= 1
    thin = 0.92 if myopic else 1.0
    return Vasculature(
        artery_gain=traits.calibre * traits.av_ratio * artery * thin,
        vein_gain=traits.calibre * vein * thin,
        tortuosity=traits.tortuosity * tort * (0.55 if myopic else 1.0),
        bend=0.85 if myopic else 1.0,
        fine_keep=keep,
    )


@dataclass(frozen=True)
class Branch:
    """One vessel segment between its origin and where it ends (FOV rim, fovea, or its own length)."""

    pts: np.ndarray  # (n, 2) canonical retina coordinates
    width: np.ndarray  # (n,) nominal width, FOV radii
    vein: bool
    parent: int  # index of the parent branch in the tree, -1 for a trunk
    keep: float  # uniform draw: a fine branch is drawn when keep < Vasculature.fine_keep


@dataclass(frozen=True)
class _Sprout:
    """A branch yet to grow."""

    start: tuple[float, float]
    heading: float  # radians, image convention (v down)
    width: float
    length: float
    bend: float  # deterministic curvature, 1/FOV radii
    vein: bool
    parent: int
    key: int


def trace(start: tuple[float, float], heading: float, curvature: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Path from `start` integrating per-step `curvature` (1/FOV radii): (n, 2) points and (n,) headings."""
    theta = heading + np.cumsum(curvature) * STEP
    steps = STEP * np.exp(1j * theta)
    steps[0] = complex(*start)
    return np.cumsum(steps).view(np.float64).reshape(-1, 2), theta


def wiggle(rng: np.random.Generator, n: int, amplitude: float) -> np.ndarray:
    """Smoothed white curvature noise: gentle waves rather than jitter."""
    return amplitude * np.convolve(rng.standard_normal(n + len(_SMOOTH) - 1), _SMOOTH, mode="valid")


def _trunks(layout: Layout, bend: float) -> list[_Sprout]:
    """Temporal arcades, nasal vessels and small papillomacular vessels, each as an artery and a vein."""
    disc, fovea = np.asarray(layout.disc), np.asarray(layout.fovea)
    arc = bend / (1.05 * float(np.hypot(*(fovea - disc))))
    ry = layout.disc_radii[1]
    # (heading deg, width, length, bend, start offset in disc radii) for veins; arteries vary from these
    plan = [
        (-78, 0.031, 2.0, arc, (0.0, -0.12)),
        (78, 0.031, 2.0, -arc, (0.0, 0.12)),
        (-122, 0.021, 1.3, -0.35, (-0.1, -0.15)),
        (122, 0.021, 1.3, 0.35, (-0.1, 0.15)),
        (178, 0.010, 0.8, 0.2, (-0.2, 0.0)),
        (-8, 0.007, 0.5, 0.6, (0.2, -0.1)),
        (10, 0.006, 0.5, -0.6, (0.2, 0.1)),
    ]
    sprouts = []
    for i, (deg, width, length, curve, (ox, oy)) in enumerate(plan):
        for vein in (True, False):
            # an artery leaves a little temporal to its vein, on its side, and diverges by 7 degrees
            dx, dy, turn = (
                (0.0, 0.0, 0.0) if vein else (0.12, math.copysign(0.11, deg), math.copysign(7.0, curve))
            )
            start = (float(disc[0] + ry * (ox + dx)), float(disc[1] + ry * (oy + dy)))
            w = width if vein else 0.78 * width
            key = 2 * i + int(vein) + 1  # keys are base-16 paths with non-zero digits: unique per branch
            sprouts.append(_Sprout(start, math.radians(deg + turn), w, length, curve, vein, -1, key))
    return sprouts


def _murray_angles(w0: float, w1: float, w2: float) -> tuple[float, float]:
    """Optimal turning angles (continuing branch w1, daughter w2) for a junction of parent w0."""
    a, b, c = w0 * w0, w1 * w1, w2 * w2
    keep = (a * a + b * b - c * c) / (2 * a * b)
    turn = (a * a + c * c - b * b) / (2 * a * c)
    return math.acos(min(1.0, max(-1.0, keep))), math.acos(min(1.0, max(-1.0, turn)))


def _grow(
    sp: _Sprout, index: int, rng: np.random.Generator, tortuosity: float, fovea: np.ndarray, min_width: float
) -> tuple[Branch | None, list[_Sprout]]:
    """One branch and the daughters it sheds."""
    n = max(3, int(sp.length / STEP) + 1)
    s = np.arange(n) * STEP
    amplitude = 5.0 * tortuosity * (0.012 / max(sp.width, 0.004)) ** 0.7
    curvature = sp.bend / (1.0 + 0.45 * s) + wiggle(rng, n, amplitude)
    draws = rng.random(_MAX_DAUGHTERS * 5 + 2).tolist()
    spacing = max(0.08, 12.0 * sp.width)
    junctions: list[tuple[int, float, float]] = []  # point index, parent kink, parent width factor
    daughters: list[tuple[int, int, float, float, float, float]] = []  # key, index, width, turn, length, bend
    pos, w, side = spacing * (0.2 + 0.8 * draws[-2]), sp.width, 1.0
    for j in range(_MAX_DAUGHTERS):
        gap, size, flip, spread, curl = draws[5 * j : 5 * j + 5]
        k = int(pos / STEP)
        if k >= n - 2:
            break
        child_w = w * (0.38 + 0.5 * size**1.6)
        rest = (w**3 - child_w**3) ** (1 / 3)
        keep_angle, child_angle = _murray_angles(w, rest, child_w)
        side = -side if flip < 0.75 else side
        junctions.append((k, 0.4 * side * keep_angle / STEP, rest / w))
        if child_w >= min_width:  # thinner daughters still bend and thin the parent, so trees nest
            turn = side * (child_angle + 0.3 * (spread - 0.5))
            daughters.append((j, k, child_w, turn, child_w * (55 + 35 * spread), 1.6 * (curl - 0.5)))
        w, pos = rest, pos + spacing * (0.5 + gap)
    factor = np.ones(n)
    if junctions:
        at, kink, thin = (np.asarray(column) for column in zip(*junctions, strict=True))
        curvature[at] -= kink
        factor[at] = thin
    pts, theta = trace(sp.start, sp.heading, curvature)
    du, dv = pts[:, 0] - fovea[0], pts[:, 1] - fovea[1]
    outside = (pts[:, 0] ** 2 + pts[:, 1] ** 2 > 1.03**2) | (du * du + dv * dv < _FAZ**2)
    end = int(outside.argmax()) if outside.any() else n
    if end < 2:
        return None, []
    taper = np.maximum(1.0 - 0.12 * s - np.maximum((s - 0.75 * s[-1]) / s[-1], 0.0), 0.55)
    width = sp.width * np.cumprod(factor) * taper
    branch = Branch(pts[:end], width[:end], sp.vein, sp.parent, draws[-1])
    daughters = [d for d in daughters if d[1] < end]
    at = [d[1] for d in daughters]
    sprouts = [
        _Sprout(
            (x, y), heading + turn, cw, min(length, 1.3), bend, sp.vein, index, (sp.key * 16 + j + 1) % 2**64
        )
        for (j, _, cw, turn, length, bend), (x, y), heading in zip(
            daughters, pts[at].tolist(), theta[at].tolist(), strict=True
        )
    ]
    return branch, sprouts


def _finest(px_per_unit: float) -> float:
    """Nominal width of the thinnest branch worth growing when the FOV radius is `px_per_unit` pixels."""
    return max(_W_MIN, _MIN_PX / px_per_unit)


def grow_tree(layout: Layout, vasc: Vasculature, seed: int, px_per_unit: float) -> list[Branch]:
    """All branches, parents before daughters, down to what `px_per_unit` (the FOV radius, px) resolves.

    A smaller image gets a pruned copy of a larger image's tree: the keyed generators keep the rest in place.
    """
    min_width = _finest(px_per_unit)
    fovea = np.asarray(layout.fovea)
    queue, tree = deque(_trunks(layout, vasc.bend)), []
    while queue:
        sp = queue.popleft()
        rng = np.random.Generator(np.random.Philox(key=[seed, sp.key]))
        branch, sprouts = _grow(sp, len(tree), rng, vasc.tortuosity, fovea, min_width)
        if branch is not None:
            tree.append(branch)
            queue.extend(sprouts)
    return tree


def drawn(tree: list[Branch], vasc: Vasculature, px_per_unit: float) -> list[bool]:
    """Which branches are painted: a fine branch is pruned unless its draw keeps it (the neuro sign drops
    more), and a pruned branch takes its daughters with it."""
    shown, fine = [True] * len(tree), _FINE * _finest(px_per_unit)
    for i, b in enumerate(tree):
        pruned = b.width[0] < fine and b.keep >= vasc.fine_keep
        shown[i] = not pruned and (b.parent < 0 or shown[b.parent])
    return shown


def paint_vessels(
    img: np.ndarray, canvas: Canvas, tree: list[Branch], vasc: Vasculature, beads: list[tuple[int, int, int]]
) -> None:
    """Draw veins, then arteries on top, with a thin central light reflex on the wider vessels.

    `beads` lists (branch, first point, last point) stretches of vein drawn beaded (severe DR).
    """
    veins, arteries, reflex = Layer(canvas), Layer(canvas), Layer(canvas)
    shown = drawn(tree, vasc, canvas.r)
    for i, b in enumerate(tree):
        if not shown[i]:
            continue
        width = b.width * (vasc.vein_gain if b.vein else vasc.artery_gain)
        opacity = min(1.0, 0.4 + 30.0 * float(width[0]))  # thin vessels hold less blood
        (veins if b.vein else arteries).tapered(b.pts, width, opacity=opacity)
        if 0.16 * width[0] * canvas.r >= 0.9:
            reflex.tapered(b.pts, 0.16 * width, min_px=0.9)
    for i, first, last in beads:
        if shown[i]:
            for p, w in zip(tree[i].pts[first:last:4], tree[i].width[first:last:4], strict=True):
                veins.dot(p, 0.7 * w * vasc.vein_gain)
    blur = 0.55 + 0.0012 * canvas.r
    veins.patch(min_px=blur).darken(img, _VEIN_ABSORB)
    arteries.patch(min_px=blur).darken(img, _ARTERY_ABSORB)
    reflex.patch(min_px=blur).tint(img, (1.0, 0.75, 0.6), opacity=0.2)
