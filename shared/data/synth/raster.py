"""Pixel geometry of one image, and drawing in retina coordinates.

Retina coordinates put the field of view (FOV) on the unit disc. They are canonical for a *left* eye: u grows
temporally (to the right of the image, away from the disc) and v grows downwards. A right eye is the mirror
image, so every painter draws a left eye and `Canvas` flips u for right eyes. Lengths are in FOV radii, so the
anatomy does not depend on the output size; `Canvas.r` turns them into pixels.

Images are planar float32 arrays (3, H, W) in [0, 1] while they are painted: per-channel updates of a planar
array are several times faster than of an interleaved one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

_NOISE_SPAN = 1.25  # retina_noise grids cover [-span, span]^2 so they are anchored to the eye, not the frame


@dataclass(frozen=True)
class Canvas:
    """Where the FOV lies in the output image, and which eye is drawn."""

    height: int
    width: int
    cx: float  # FOV centre, px (pixel centres are at integer coordinates)
    cy: float
    r: float  # FOV radius, px
    half_band: float  # rows farther than this from cy are cut off (rectangular-crop cameras), px
    mirror: bool  # right eye: u points to the left of the image

    def to_px(self, uv: np.ndarray) -> np.ndarray:
        """(n, 2) retina coordinates -> (n, 2) pixel coordinates (x, y)."""
        sign = -1.0 if self.mirror else 1.0
        return uv * np.array([sign * self.r, self.r]) + np.array([self.cx, self.cy])

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Retina coordinates of the pixel centres as broadcastable (1, W) and (H, 1) float32 arrays."""
        sign = -1.0 if self.mirror else 1.0
        u = sign * (np.arange(self.width, dtype=np.float32) - np.float32(self.cx)) / np.float32(self.r)
        v = (np.arange(self.height, dtype=np.float32) - np.float32(self.cy)) / np.float32(self.r)
        return u[None, :], v[:, None]

    def window(
        self, centre: Sequence[float], half: float
    ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
        """The pixel box within `half` FOV radii of `centre`, with its retina coordinates as in `grid`."""
        x, y = self.to_px(np.asarray([centre], dtype=np.float64))[0]
        reach = half * self.r + 1
        cols = slice(max(0, int(x - reach)), max(0, min(self.width, int(x + reach) + 2)))
        rows = slice(max(0, int(y - reach)), max(0, min(self.height, int(y + reach) + 2)))
        u, v = self.grid()
        return (rows, cols), u[:, cols], v[rows, :]

    def fov(self) -> np.ndarray:
        """FOV coverage in [0, 1] as (H, W) float32, anti-aliased over one pixel at the rim."""
        x = np.arange(self.width, dtype=np.float32) - np.float32(self.cx)
        y = np.arange(self.height, dtype=np.float32) - np.float32(self.cy)
        dist = np.sqrt(y[:, None] ** 2 + x[None, :] ** 2)
        cover = np.clip(np.float32(self.r + 0.5) - dist, 0.0, 1.0)
        cover[np.abs(y) > self.half_band] = 0.0
        return cover


@dataclass(frozen=True)
class Patch:
    """A layer's opacity inside its bounding box: paint operations touch only the box."""

    box: tuple[slice, slice]
    alpha: np.ndarray  # float32 (h, w) in [0, 1]

    def darken(self, img: np.ndarray, absorb: Sequence[float]) -> None:
        """Multiply by 1 - alpha * absorb per channel (absorbing media such as blood)."""
        for c in range(3):
            img[c][self.box] *= 1.0 - self.alpha * np.float32(absorb[c])

    def tint(self, img: np.ndarray, colour: Sequence[float], opacity: float = 1.0) -> None:
        """Blend toward `colour` with weight alpha * opacity (deposits and pale tissue)."""
        weight = self.alpha * np.float32(opacity)
        for c in range(3):
            region = img[c][self.box]
            region += (np.float32(colour[c]) - region) * weight


class Layer:
    """An 8-bit opacity surface (255 = opaque) drawn in retina coordinates with PIL."""

    def __init__(self, canvas: Canvas) -> None:
        self.canvas = canvas
        self.image = Image.new("L", (canvas.width, canvas.height))
        self._draw = ImageDraw.Draw(self.image)

    def tapered(self, uv: np.ndarray, width: np.ndarray, opacity: float = 1.0, min_px: float = 0.0) -> None:
        """A polyline whose width (FOV radii) varies per point; runs thinner than `min_px` are skipped.

        PIL only draws whole-pixel widths, so a line is drawn at the rounded width with its fill scaled by
        width / rounded width: sub-pixel vessels come out faint instead of vanishing or fattening.
        """
        px = width * self.canvas.r
        if px.max() < min_px:
            return
        whole = np.maximum(1, np.rint(px)).astype(np.int32)
        level = np.rint(16.0 * opacity * np.minimum(1.0, px / whole)).astype(np.int32)
        key = whole * 32 + level
        bounds = [0, *(np.flatnonzero(np.diff(key)) + 1).tolist(), len(key)]
        flat = self.canvas.to_px(uv).ravel().tolist()
        for start, stop in itertools.pairwise(bounds):
            fill, thick = int(level[start]) * 255 // 16, int(whole[start])
            run = flat[2 * start : 2 * min(stop + 1, len(key))]
            if px[start] >= min_px and fill > 0 and len(run) >= 4:
                self._draw.line(run, fill=fill, width=thick, joint="curve" if thick >= 3 else None)

    def polygon(self, uv: np.ndarray, opacity: float = 1.0) -> None:
        """A filled polygon from (n, 2) retina coordinates."""
        self._draw.polygon(self.canvas.to_px(uv).ravel().tolist(), fill=round(255 * opacity))

    def dot(self, centre: Sequence[float], radius: float, opacity: float = 1.0) -> None:
        """A filled circle of `radius` FOV radii; at least one pixel, so a drawn lesion is never lost."""
        (x, y), rad = self.canvas.to_px(np.asarray([centre], dtype=np.float64))[0], radius * self.canvas.r
        fill = round(255 * opacity)
        if rad < 0.75:
            self._draw.point((round(x), round(y)), fill=fill)
        else:
            self._draw.ellipse((x - rad, y - rad, x + rad, y + rad), fill=fill)

    def mask(self) -> np.ndarray:
        """Pixels drawn at all, (H, W) bool: the exact lesion mask."""
        return np.asarray(self.image) > 0

    def patch(self, blur: float = 0.0, min_px: float = 0.0) -> Patch:
        """Opacity after a Gaussian blur of `blur` FOV radii (at least `min_px` pixels), cut to its box.

        Wide blurs run on a shrunk copy and are scaled back up, which costs little and looks the same.
        """
        sigma = max(blur * self.canvas.r, min_px)
        bbox = self.image.getbbox()
        if bbox is None:
            return Patch((slice(0, 0), slice(0, 0)), np.zeros((0, 0), np.float32))
        pad = int(np.ceil(3 * sigma)) + 1
        x0, y0 = max(0, bbox[0] - pad), max(0, bbox[1] - pad)
        x1, y1 = min(self.canvas.width, bbox[2] + pad), min(self.canvas.height, bbox[3] + pad)
        crop = self.image.crop((x0, y0, x1, y1))
        shrink = max(1, int(sigma / 2.0))
        if shrink > 1:
            small = crop.resize((max(1, crop.width // shrink), max(1, crop.height // shrink)), Image.BOX)
            crop = small.filter(ImageFilter.GaussianBlur(sigma / shrink)).resize(crop.size, Image.BILINEAR)
        elif sigma > 0:
            crop = crop.filter(ImageFilter.GaussianBlur(sigma))
        alpha = np.asarray(crop, dtype=np.float32) * np.float32(1 / 255)
        return Patch((slice(y0, y1), slice(x0, x1)), alpha)


def retina_noise(rng: np.random.Generator, canvas: Canvas, cells: int) -> np.ndarray:
    """Smooth zero-mean noise (about unit std) with `cells` features across the FOV, (H, W) float32.

    The grid is fixed to retina coordinates, so one eye seen through two cameras keeps its texture.
    """
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    if canvas.mirror:
        grid = grid[:, ::-1]
    cell = 2 * _NOISE_SPAN / cells  # retina units
    reach = max(canvas.cx, canvas.width - canvas.cx, canvas.cy, canvas.height - canvas.cy) + 0.5
    pad = max(0, int(np.ceil((reach / canvas.r - _NOISE_SPAN) / cell))) + 1  # frames wider than the grid
    source = Image.fromarray(np.pad(grid, pad, mode="edge"), "F")

    def edge(offset: float) -> float:  # pixel offset from the FOV centre -> source grid coordinate
        return offset / canvas.r / cell + cells / 2 + pad

    box = (
        edge(-0.5 - canvas.cx),
        edge(-0.5 - canvas.cy),
        edge(canvas.width - 0.5 - canvas.cx),
        edge(canvas.height - 0.5 - canvas.cy),
    )
    return np.asarray(source.resize((canvas.width, canvas.height), Image.BICUBIC, box=box))


def ellipse_points(centre: Sequence[float], radii: Sequence[float], angle: float, n: int = 20) -> np.ndarray:
    """(n, 2) vertices of an ellipse rotated by `angle` radians."""
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    x, y = radii[0] * np.cos(t), radii[1] * np.sin(t)
    ca, sa = np.cos(angle), np.sin(angle)
    return np.stack([centre[0] + ca * x - sa * y, centre[1] + sa * x + ca * y], axis=1)


def blob_points(
    rng: np.random.Generator, centre: Sequence[float], radius: float, rough: float, n: int = 24
) -> np.ndarray:
    """(n, 2) vertices of an irregular round patch: the radius wobbles smoothly by about `rough`."""
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    harmonics = rng.standard_normal((2, 3)) * rough / np.arange(1, 4)
    k = np.arange(2, 5)[:, None]
    wobble = harmonics[0] @ np.cos(k * t) + harmonics[1] @ np.sin(k * t)
    rad = radius * np.clip(1.0 + wobble, 0.4, 1.8)
    return np.stack([centre[0] + rad * np.cos(t), centre[1] + rad * np.sin(t)], axis=1)
