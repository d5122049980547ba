"""ImageNet-C corruptions (Hendrycks & Dietterich 2019) of fundus images, reproducible from a seed.

The 15 benchmark corruptions (noise: gaussian, shot, impulse; blur: defocus, glass, motion, zoom; weather:
snow, frost, fog; digital: brightness, contrast, elastic, pixelate, jpeg) at severities 1-5, as implemented
by `imagecorruptions-imaug` (the maintained fork of `imagecorruptions`, same import name; the original no
longer imports). Its parameter table is ImageNet-C's, but motion blur (and snow's motion-blurred layer)
shifts with numpy/cv2 instead of ImageMagick, so outputs are close to ImageNet-C's, not bit-identical.

Seeding: the library draws from numpy's *global* RandomState (np.random.normal, ...), except glass_blur
(numba's own generator) and impulse_noise (scikit-image's), which take a `seed` argument and otherwise draw
fresh entropy. `corrupt` seeds all three from one seed, and seeds the global state inside a context manager
that restores it afterwards: otherwise each call would reset the caller's stream (shuffles or dropout
seeded by `seed_everything`) to a fixed point, and the caller's earlier draws would change our corruptions.
That state is process-wide, so do not corrupt from several threads at once.

Strength (`corruption_strength`): the mean absolute change in grey levels (0-255, over pixels and channels)
at each severity, the documented amount of each corruption on our images. On scikit-image's retina at
128 px it grows with the severity for 11 of the 15; glass_blur (severity 3 shuffles pixels three times,
severity 4 twice), snow (severity 2 vs 3), frost and fog (random textures) are not monotone in it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import imagecorruptions
import numpy as np

from shared.seeding import derive_seed

CORRUPTIONS: tuple[str, ...] = tuple(imagecorruptions.get_corruption_names("common"))
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
MIN_SIDE = 32  # the library refuses smaller images


def corrupt(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """`image` (H, W, 3) uint8 corrupted by `name` at `severity` (1-5): a new (H, W, 3) uint8 array.

    The same (image, name, severity, seed) always gives the same bytes; numpy's global random state is
    left as it was.
    """
    _check_image(image)
    if name not in CORRUPTIONS:
        raise ValueError(f"name: unknown corruption {name!r}; use one of {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity: {severity!r} is not an integer from 1 to 5")
    seed32 = seed % 2**32  # what numpy's and numba's seed functions take
    with _global_numpy_seed(seed32):
        out = imagecorruptions.corrupt(image, severity, name, **_own_seed(name, seed32))
    if out.shape != image.shape or out.dtype != np.uint8:  # the library's contract; guards an upgrade
        raise RuntimeError(f"{name} returned {out.shape} {out.dtype} for a {image.shape} uint8 image")
    return out


def corruption_strength(
    images: Sequence[np.ndarray],
    *,
    names: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
) -> dict[str, list[float]]:
    """{name: [mean |corrupted - image| at each severity]} in grey levels, averaged over `images`.

    Image i is corrupted with seed `derive_seed(seed, name, i)` at every severity (the same random draws at
    each severity, so the curve shows the severity's effect, not the draws').
    """
    if not images:
        raise ValueError("images: pass at least one (H, W, 3) uint8 image")
    return {name: [_mean_abs_change(images, name, s, seed) for s in severities] for name in names}


def _mean_abs_change(images: Sequence[np.ndarray], name: str, severity: int, seed: int) -> float:
    changes = [
        np.abs(corrupt(image, name, severity, derive_seed(seed, name, i)).astype(np.int16) - image).mean()
        for i, image in enumerate(images)
    ]
    return float(np.mean(changes))


@contextmanager
def _global_numpy_seed(seed: int) -> Iterator[None]:
    """numpy's global RandomState seeded with `seed` inside, restored to the caller's state after."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


def _own_seed(name: str, seed: int) -> dict[str, int]:
    """The `seed` keyword for corruptions that draw from their own generator (glass_blur, impulse_noise)."""
    takes_seed = "seed" in inspect.signature(imagecorruptions.corruption_dict[name]).parameters
    return {"seed": seed} if takes_seed else {}


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image: expected an (H, W, 3) uint8 array, got {got}")
    if min(image.shape[:2]) < MIN_SIDE:
        side = f"{image.shape[0]}x{image.shape[1]}"
        raise ValueError(f"image: {side} is too small; both sides need at least {MIN_SIDE} px")
