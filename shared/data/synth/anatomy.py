"""The healthy fundus: patient traits, where disc and fovea lie, background, macula and optic disc.

Calibrated by eye against `skimage.data.retina()` and typical 45-degree photographs: the disc is about 1/8 of
the FOV diameter and lies about 2.5 disc diameters nasal to the fovea, a little above it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.data.synth.raster import Canvas, Layer, ellipse_points, retina_noise

_LIGHT_FUNDUS = np.array([0.97, 0.42, 0.30], np.float32)  # blond fundus at the posterior pole
_DARK_FUNDUS = np.array([0.74, 0.25, 0.16], np.float32)  # heavily pigmented fundus
_MYOPIC_PALE = np.array([0.92, 0.52, 0.34], np.float32)  # thin RPE: paler, more orange
_DISC_RIM = np.array([1.0, 0.66, 0.48], np.float32)
_DISC_CUP = np.array([1.0, 0.86, 0.70], np.float32)


@dataclass(frozen=True)
class Traits:
    """What a patient's two eyes share."""

    pigment: float  # 0 = blond fundus, 1 = heavily pigmented
    disc_radius: float  # vertical disc radius, FOV radii
    cup_ratio: float  # cup / disc diameter
    calibre: float  # multiplies every vessel width
    av_ratio: float  # multiplies artery widths on top of `calibre`
    tortuosity: float  # multiplies the curvature noise of every vessel


def patient_traits(rng: np.random.Generator) -> Traits:
    """Draw a patient; spreads are wide enough that a subtle group effect is invisible in one image."""
    return Traits(
        pigment=float(rng.beta(2.0, 2.0)),
        disc_radius=float(0.145 * np.exp(0.09 * rng.standard_normal())),
        cup_ratio=float(np.clip(rng.normal(0.38, 0.1), 0.15, 0.65)),
        calibre=float(np.exp(0.10 * rng.standard_normal())),
        av_ratio=float(np.exp(0.07 * rng.standard_normal())),
        tortuosity=float(np.exp(0.35 * rng.standard_normal())),
    )


@dataclass(frozen=True)
class Layout:
    """One eye's landmarks in canonical retina coordinates (see `raster`)."""

    fovea: tuple[float, float]
    disc: tuple[float, float]
    disc_radii: tuple[float, float]  # (horizontal, vertical), FOV radii
    disc_tilt: float  # radians
    cup_ratio: float
    pale: float  # 0 = normal fundus colour, 1 = fully myopic pale fundus


def eye_layout(traits: Traits, mm_grade: int, rng: np.random.Generator) -> Layout:
    """Place fovea and disc; myopic eyes get an oval, tilted disc and a paler fundus."""
    fovea = (0.04 + 0.03 * rng.standard_normal(), 0.03 + 0.03 * rng.standard_normal())
    distance = traits.disc_radius * 2 * rng.uniform(2.4, 2.8)
    rise = rng.uniform(0.03, 0.12)
    disc = (fovea[0] - distance, fovea[1] - rise)
    squash, tilt = rng.uniform(0.86, 0.96), rng.normal(0.0, 0.08)
    if mm_grade >= 1:
        squash, tilt = rng.uniform(0.62, 0.8), rng.normal(0.0, 0.25)
    pale = 0.0 if mm_grade == 0 else min(1.0, 0.35 + 0.15 * mm_grade)
    return Layout(
        fovea=fovea,
        disc=disc,
        disc_radii=(traits.disc_radius * squash, traits.disc_radius),
        disc_tilt=float(tilt),
        cup_ratio=traits.cup_ratio,
        pale=pale,
    )


def paint_background(canvas: Canvas, traits: Traits, layout: Layout, rng: np.random.Generator) -> np.ndarray:
    """Choroid seen through the RPE: pigment colour, choroidal mottling, vignetting, uneven lighting.

    Returns the planar (3, H, W) float32 image every later painter works on.
    """
    colour = (1 - traits.pigment) * _LIGHT_FUNDUS + traits.pigment * _DARK_FUNDUS
    colour = (1 - 0.6 * layout.pale) * colour + 0.6 * layout.pale * _MYOPIC_PALE
    u, v = canvas.grid()
    rho2 = u * u + v * v
    tilt = rng.normal(0.0, 0.06, size=2).astype(np.float32)
    light = (1.0 - 0.13 * rho2 - 0.12 * rho2 * rho2) * (1.0 + tilt[0] * u + tilt[1] * v)
    mottle = 0.035 * retina_noise(rng, canvas, 7) + 0.025 * retina_noise(rng, canvas, 30)
    grain = 0.015 * retina_noise(rng, canvas, 90)
    img = np.empty((3, canvas.height, canvas.width), np.float32)
    for c, swing in enumerate((0.5, 1.0, 1.1)):
        img[c] = colour[c] * light * (1.0 + swing * mottle + grain)
    return img


def paint_macula(img: np.ndarray, canvas: Canvas, layout: Layout) -> None:
    """Macular pigment: a broad darker, redder zone, a small dark fovea and a tiny bright foveal reflex."""
    u, v = canvas.grid()
    du, dv = u - np.float32(layout.fovea[0]), v - np.float32(layout.fovea[1])

    def bump(sigma: float) -> np.ndarray:
        return np.exp(-(dv * dv) / np.float32(2 * sigma**2)) * np.exp(-(du * du) / np.float32(2 * sigma**2))

    zone, pit = bump(0.17), bump(0.045)
    reflex = 0.35 * bump(max(0.006, 0.6 / canvas.r))
    for c, (dim_zone, dim_pit) in enumerate(((0.12, 0.10), (0.28, 0.25), (0.30, 0.25))):
        img[c] *= 1.0 - dim_zone * zone - dim_pit * pit
        img[c] += (1.0 - img[c]) * reflex


def paint_disc(img: np.ndarray, canvas: Canvas, layout: Layout) -> np.ndarray:
    """Optic disc with a soft rim, a paler cup offset temporally and a faint yellow halo.

    Returns the disc mask, (H, W) bool.
    """
    (rx, ry), angle = layout.disc_radii, layout.disc_tilt
    box, u, v = canvas.window(layout.disc, 5.0 * ry)  # the halo fades out within 5 disc radii
    du, dv = u - np.float32(layout.disc[0]), v - np.float32(layout.disc[1])
    ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    a, b = (ca * du + sa * dv) / np.float32(rx), (ca * dv - sa * du) / np.float32(ry)
    d2 = a * a + b * b  # 1 on the disc margin
    body = np.clip((1.08 - np.sqrt(d2)) / 0.16, 0.0, 1.0)
    halo = np.exp(-0.5 * d2 / np.float32(1.9**2))
    cup_a = (a - np.float32(0.25 * layout.cup_ratio)) / np.float32(layout.cup_ratio)
    cup = np.clip((1.2 - np.sqrt(cup_a * cup_a + (b * b) / np.float32(layout.cup_ratio**2))) / 0.9, 0.0, 1.0)
    temporal = np.clip(0.5 + 0.5 * a, 0.0, 1.0)  # the temporal rim is paler than the nasal one
    for c in range(3):
        rim = _DISC_RIM[c] * (0.92 + 0.08 * temporal)
        region = img[c][box]
        region += (np.float32(0.95 * _DISC_RIM[c]) - region) * (0.25 * halo)
        region += (rim - region) * body
        region += (np.float32(_DISC_CUP[c]) - region) * (0.85 * cup)
    disc = Layer(canvas)
    disc.polygon(ellipse_points(layout.disc, layout.disc_radii, angle, n=32))
    return disc.mask()
