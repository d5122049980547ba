"""Find the circular fundus field of view (FOV), crop a square around it and resize: one geometry for every
camera, so models see the retina at one scale.

Handles round FOVs, FOVs cut flat at the top and bottom (rectangular-crop cameras), off-centre FOVs and
images stored inverted (the crop is orientation-free, and nothing here guesses left/right from a flip).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from shared.data.images import Decoded, ImageProblem, decode

DETECT_SIDE = 256  # FOV detection runs on a copy of at most this side
MIN_FOV_FRACTION = 0.05  # a FOV smaller than this fraction of the image area is "no FOV found"


@dataclass(frozen=True)
class FieldOfView:
    cx: float
    cy: float
    r: float  # pixels of the source image


@dataclass(frozen=True)
class Preprocessed:
    rgb: np.ndarray  # uint8 (size, size, 3), black outside the FOV
    fov: np.ndarray  # bool (size, size)
    source: Decoded


def threshold(lum: np.ndarray) -> float:
    """Dark-border threshold: a little above JPEG noise, well below the dimmest retina."""
    return max(12.0, 0.12 * float(np.percentile(lum, 99)))


def find_fov(rgb: np.ndarray) -> FieldOfView:
    """Locate the FOV circle: the largest bright component; its width (or height) is the diameter."""
    h, w = rgb.shape[:2]
    step = max(1, int(np.ceil(max(h, w) / DETECT_SIDE)))
    lum = rgb[::step, ::step].max(axis=2).astype(np.float32)
    mask = ndimage.binary_opening(lum > threshold(lum), iterations=1)
    labels, n = ndimage.label(mask)
    if n == 0:
        raise ImageProblem("no-fov", "no fundus field of view found (the image is black or blank)")
    sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
    component = labels == (int(np.argmax(sizes)) + 1)
    if component.sum() < MIN_FOV_FRACTION * component.size:
        raise ImageProblem("no-fov", "no fundus field of view found (bright area too small for a retina)")
    rows = np.flatnonzero(component.any(axis=1))
    cols = np.flatnonzero(component.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    width, height = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if height < 0.95 * width:  # cut top/bottom: the widest rows run through the centre
        cy = _widest(component.sum(axis=1)) + 0.5
    elif width < 0.95 * height:
        cx = _widest(component.sum(axis=0)) + 0.5
    r = max(width, height) / 2
    return FieldOfView(float(cx * step), float(cy * step), float(r * step))


def crop_to_fov(rgb: np.ndarray, fov: FieldOfView, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Square crop of side 2r around the FOV (black where it leaves the image), resized to `size`.

    Returns the RGB crop, black outside the FOV, and the FOV mask: inside the circle AND bright (so flat
    top/bottom cuts stay outside), with dark lesions inside the retina kept in by hole filling.
    """
    h, w = rgb.shape[:2]
    side = max(1, round(2 * fov.r))
    left, top = round(fov.cx - fov.r), round(fov.cy - fov.r)
    canvas = np.zeros((side, side, 3), dtype=np.uint8)
    sx0, sy0, sx1, sy1 = max(left, 0), max(top, 0), min(left + side, w), min(top + side, h)
    if sx1 > sx0 and sy1 > sy0:
        canvas[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = rgb[sy0:sy1, sx0:sx1]
    out = np.asarray(Image.fromarray(canvas).resize((size, size), Image.BICUBIC, reducing_gap=2.0))
    lum = out.max(axis=2).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    centre = (size - 1) / 2
    circle = (yy - centre) ** 2 + (xx - centre) ** 2 <= (size / 2) ** 2
    fov_mask = circle & ndimage.binary_fill_holes(lum > threshold(lum))
    return np.where(fov_mask[..., None], out, 0).astype(np.uint8), fov_mask


def preprocess(path: Path, size: int) -> Preprocessed:
    """Decode, find the FOV, crop and resize to `size`; raises `ImageProblem` for unusable files."""
    decoded = decode(path, draft=2 * size)
    rgb, fov = crop_to_fov(decoded.rgb, find_fov(decoded.rgb), size)
    return Preprocessed(rgb, fov, decoded)


def _widest(profile: np.ndarray) -> float:
    top = profile.max()
    return float(np.mean(np.flatnonzero(profile >= 0.99 * top)))
