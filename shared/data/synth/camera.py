"""Camera and site styles: where the FOV falls in the frame, and what the optics and sensor do to colour.

Geometry (FOV radius and offset, rectangular crop, aspect) is fixed before painting through `canvas_for`, so
lesion masks are drawn straight into the final frame and stay aligned. Colour, blur and noise come after.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageChops, ImageFilter
from scipy import special

from shared.data.synth.raster import Canvas


@dataclass(frozen=True)
class CameraStyle:
    name: str
    colour: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel gain (colour cast)
    gamma: float = 1.0  # > 1 darkens the mid-tones
    contrast: float = 1.0  # around the mean of the FOV
    blur: float = 0.0  # gaussian sigma, in units of 1/512 of the image side
    noise: float = 0.0  # gaussian noise std on [0, 1] scale
    fov_radius: float = 0.46  # FOV radius as a fraction of the image height
    fov_offset: tuple[float, float] = (0.0, 0.0)  # FOV centre offset (dx, dy) as a fraction of the height
    crop_top_bottom: float = 0.0  # fraction of the FOV diameter cut off at top and at bottom
    aspect: float = 1.0  # output width / height; the FOV stays round, with black margins left and right
    jpeg_quality: int = 90  # not applied here: the dataset writer uses it when encoding .jpeg
    vignette: float = 0.0  # extra darkening toward the rim from the camera's optics

    def __post_init__(self) -> None:
        if not 0.0 <= self.crop_top_bottom < 0.5:
            raise ValueError(f"crop_top_bottom must be in [0, 0.5), got {self.crop_top_bottom}")
        if self.aspect <= 0 or self.fov_radius <= 0 or self.gamma <= 0:
            raise ValueError(f"aspect, fov_radius and gamma must be positive, got {self}")


CAMERA_STYLES: dict[str, CameraStyle] = {
    style.name: style
    for style in (
        # UK Biobank-like Topcon: warm, clean, round FOV on a square frame
        CameraStyle("topcon", colour=(1.04, 0.98, 0.9), contrast=1.05, blur=0.3, noise=0.004),
        # EyePACS is many clinics; this kind crops the FOV top and bottom on a 3:2 sensor, cool and soft
        CameraStyle(
            "eyepacs-mixed-a",
            colour=(0.94, 1.03, 1.08),
            gamma=0.95,
            contrast=0.92,
            blur=1.3,
            noise=0.02,
            fov_radius=0.58,
            fov_offset=(0.01, 0.0),
            crop_top_bottom=0.08,
            aspect=1.5,
            jpeg_quality=75,
        ),
        # another kind: dim, red-heavy and noisy, round FOV off-centre on a 3:2 frame
        CameraStyle(
            "eyepacs-mixed-b",
            colour=(1.08, 0.9, 0.82),
            gamma=1.3,
            contrast=1.1,
            blur=0.7,
            noise=0.03,
            fov_radius=0.47,
            fov_offset=(-0.02, 0.01),
            aspect=1.5,
            jpeg_quality=70,
        ),
        # MMAC: myopic population camera, greener and cooler, a little flat
        CameraStyle(
            "mmac", colour=(0.9, 1.08, 1.05), gamma=0.9, contrast=0.95, blur=0.5, noise=0.01, fov_radius=0.47
        ),
        # IDRiD: Kowa-like, sharp high-resolution 3:2 frames with a strong vignette, FOV just clipped
        CameraStyle(
            "idrid",
            colour=(1.06, 0.94, 0.8),
            contrast=1.12,
            noise=0.006,
            fov_radius=0.5,
            crop_top_bottom=0.02,
            aspect=1.5,
            vignette=0.45,
            jpeg_quality=95,
        ),
        # Messidor-like: round FOV on a 3:2 frame, neutral, mild blur
        CameraStyle(
            "messidor",
            colour=(1.0, 0.97, 0.97),
            gamma=1.1,
            blur=0.8,
            noise=0.012,
            fov_radius=0.45,
            aspect=1.5,
        ),
    )
}


def canvas_for(style: CameraStyle, height: int, mirror: bool) -> Canvas:
    """The output frame of `height` rows that this camera produces."""
    width = round(height * style.aspect)
    r = style.fov_radius * height
    return Canvas(
        height=height,
        width=width,
        cx=(width - 1) / 2 + style.fov_offset[0] * height,
        cy=(height - 1) / 2 + style.fov_offset[1] * height,
        r=r,
        half_band=r * (1.0 - 2.0 * style.crop_top_bottom),
        mirror=mirror,
    )


def exposure(style: CameraStyle, rng: np.random.Generator) -> CameraStyle:
    """This photograph's settings: the camera's, with its flash, the pupil and the focus varying from shot to
    shot (overall gain x exp(N(0, 0.12)), a colour cast of about 4% per channel, gamma x exp(N(0, 0.08)))."""
    gain = np.exp(rng.normal(0.0, 0.12)) * np.exp(rng.normal(0.0, 0.04, 3))
    return replace(
        style,
        colour=tuple(float(c * g) for c, g in zip(style.colour, gain, strict=True)),
        gamma=float(style.gamma * np.exp(rng.normal(0.0, 0.08))),
    )


def _tone_curve(style: CameraStyle, channel: int, mean: float) -> list[int]:
    """256-entry lookup table: colour gain, contrast around the FOV mean, then gamma."""
    x = np.arange(256) / 255.0 * style.colour[channel]
    x = np.clip((x - mean) * style.contrast + mean, 0.0, 1.0) ** style.gamma
    return np.rint(255 * x).astype(int).tolist()


def _noise_curve(noise: float) -> list[int]:
    """Maps uniform bytes to 128 + gaussian noise of std `noise` (on [0, 1]) through the normal quantiles."""
    quantiles = special.ndtri((np.arange(256) + 0.5) / 256)
    return np.clip(np.rint(128 + 255 * noise * quantiles), 0, 255).astype(int).tolist() * 3


def photograph(
    img: np.ndarray, canvas: Canvas, style: CameraStyle, fov: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Planar (3, H, W) float scene -> (H, W, 3) uint8 photograph; black outside `fov` (`Canvas.fov`).

    Runs on 8-bit images in PIL, where lookup tables, blur and compositing cost little.
    """
    sample = fov[::4, ::4] > 0.5
    shot = exposure(style, rng)
    planes = []
    for c in range(3):
        channel = img[c]
        mean = float(channel[::4, ::4][sample].mean()) * shot.colour[c] if sample.any() else 0.5
        eight = Image.fromarray(np.clip(channel * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        planes.append(eight.point(_tone_curve(shot, c, mean)))
    photo = Image.merge("RGB", planes)
    sigma = style.blur * canvas.height / 512
    if sigma > 0.2:
        photo = photo.filter(ImageFilter.GaussianBlur(sigma))
    if style.noise:
        grain = Image.frombytes("RGB", photo.size, rng.bytes(3 * canvas.width * canvas.height))
        photo = ImageChops.add(photo, grain.point(_noise_curve(style.noise)), scale=1.0, offset=-128)
    if style.vignette:
        x = np.arange(canvas.width, dtype=np.float32) - np.float32(canvas.cx)
        y = np.arange(canvas.height, dtype=np.float32) - np.float32(canvas.cy)
        rho2 = (y[:, None] ** 2 + x[None, :] ** 2) / np.float32(canvas.r**2)
        fov = fov * (1.0 - np.float32(style.vignette) * rho2 * rho2)
    mask = Image.fromarray((np.clip(fov, 0.0, 1.0) * 255 + 0.5).astype(np.uint8), "L")
    return np.array(Image.composite(photo, Image.new("RGB", photo.size), mask))
