"""Augmentation recipes, with random parameters drawn apart from the pure kernels that apply them.

- "light": SparK's pretraining recipe, RandomResizedCrop(scale 0.67-1) + horizontal flip.
- "heavy": nn-MobileNet's fine-tuning recipe, RandomResizedCrop(scale 0.08-1), horizontal and vertical
  flips, rotation +-180 deg, colour jitter 0.4 (brightness, contrast, saturation and hue, random order),
  then normalisation and random erasing (p 0.4).
- "contrastive": RandomResizedCrop(scale 0.2-1), horizontal flip, colour jitter (0.4, 0.4, 0.4, hue 0.1): the
  natural-photo classifier's crops.
- "moco": MoCo v2's recipe for its two views, "contrastive" with the jitter applied with p 0.8, then grayscale
  (p 0.2) and Gaussian blur (p 0.5, sigma 0.1-2.0 at 224 px, scaled to the image): without them two views of
  a photo share its colour and sharpness, a shortcut to telling photos apart. The heavy recipe makes two
  views of one fundus almost unrelated.
- "none": evaluation; the cached image is already the FOV crop at the target size.

Parameters come from an explicit `torch.Generator` (seeded per image and epoch by the dataset), so the
same run draws the same augmentations whatever the number of loader workers. The FOV mask follows every
geometric step (nearest-neighbour), so SparK can skip patches outside the retina after augmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

Recipe = Literal["light", "heavy", "contrastive", "moco", "none"]

# Fundus statistics (RGB, on [0, 1]) used by nn-MobileNet for MMAC; `site check` reports a site's own.
FUNDUS_MEAN = (0.4258, 0.2974, 0.2129)
FUNDUS_STD = (0.2767, 0.2024, 0.1686)

CROP_SCALE = {"light": (0.67, 1.0), "heavy": (0.08, 1.0), "contrastive": (0.2, 1.0), "moco": (0.2, 1.0)}
RATIO = (3 / 4, 4 / 3)
JITTER = 0.4
HUE = {"heavy": 0.4, "contrastive": 0.1, "moco": 0.1}
MOCO_JITTER_P, MOCO_GRAY_P, MOCO_BLUR_P, MOCO_SIGMA = 0.8, 0.2, 0.5, (0.1, 2.0)  # sigma at 224 px
ERASE_P, ERASE_SCALE, ERASE_RATIO = 0.4, (0.02, 0.33), (0.3, 3.3)


@dataclass(frozen=True)
class Params:
    crop: tuple[int, int, int, int]  # top, left, height, width in the source
    hflip: bool = False
    vflip: bool = False
    angle: float = 0.0
    jitter: tuple[tuple[str, float], ...] = ()  # (operation, factor) in application order
    gray: bool = False
    blur: float = 0.0  # Gaussian sigma in output pixels; 0: none
    erase: tuple[int, int, int, int] | None = None  # top, left, height, width in the output


def draw(recipe: Recipe, src: int, out: int, g: torch.Generator) -> Params:
    """Draw one image's augmentation parameters for a square `src`-px input and `out`-px output."""
    if recipe == "none":
        return Params((0, 0, src, src))
    crop = _random_box(src, CROP_SCALE[recipe], RATIO, g) or (0, 0, src, src)
    hflip = _uniform(g) < 0.5
    if recipe == "light":
        return Params(crop, hflip=hflip)
    heavy = recipe == "heavy"
    vflip = heavy and _uniform(g) < 0.5
    angle = _uniform(g, -180.0, 180.0) if heavy else 0.0
    order = torch.randperm(4, generator=g).tolist()
    ops = ("brightness", "contrast", "saturation", "hue")
    hue = HUE[recipe]
    jitter = tuple(
        (ops[i], _uniform(g, -hue, hue) if ops[i] == "hue" else _uniform(g, 1 - JITTER, 1 + JITTER))
        for i in order
    )
    erase = _random_box(out, ERASE_SCALE, ERASE_RATIO, g) if heavy and _uniform(g) < ERASE_P else None
    if recipe != "moco":
        return Params(crop, hflip, vflip, angle, jitter, erase=erase)
    jitter = jitter if _uniform(g) < MOCO_JITTER_P else ()
    gray = _uniform(g) < MOCO_GRAY_P
    blur = _uniform(g, *MOCO_SIGMA) * out / 224 if _uniform(g) < MOCO_BLUR_P else 0.0
    return Params(crop, hflip, jitter=jitter, gray=gray, blur=blur)


def apply(image: torch.Tensor, fov: torch.Tensor, p: Params, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply `p` to a float image (3, S, S) in [0, 1] and its bool FOV mask (1, S, S)."""
    top, left, h, w = p.crop
    if (h, w) != (out, out) or (top, left) != (0, 0) or image.shape[-1] != out:
        image = F.resized_crop(image, top, left, h, w, [out, out], InterpolationMode.BICUBIC, antialias=True)
        fov = F.resized_crop(fov, top, left, h, w, [out, out], InterpolationMode.NEAREST)
    if p.hflip:
        image, fov = F.horizontal_flip(image), F.horizontal_flip(fov)
    if p.vflip:
        image, fov = F.vertical_flip(image), F.vertical_flip(fov)
    if p.angle:
        image = F.rotate(image, p.angle, InterpolationMode.BILINEAR, fill=[0.0])
        fov = F.rotate(fov, p.angle, InterpolationMode.NEAREST, fill=[0])
    image = image.clamp_(0, 1)
    for op, factor in p.jitter:
        image = _JITTER_OPS[op](image, factor)
    if p.gray:
        image = F.rgb_to_grayscale(image, num_output_channels=3)
    if p.blur:
        kernel = 2 * math.ceil(3 * p.blur) + 1  # +-3 sigma, as torchvision sizes a blur by its sigma
        image = F.gaussian_blur(image, [kernel, kernel], [p.blur, p.blur])
    return image, fov


def normalise(image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return F.normalize(image, list(mean), list(std))


def erase(image: torch.Tensor, p: Params) -> torch.Tensor:
    """Random erasing on the normalised image: the box becomes 0, i.e. the dataset's mean colour."""
    if p.erase is None:
        return image
    top, left, h, w = p.erase
    return F.erase(image, top, left, h, w, torch.zeros(()))


_JITTER_OPS = {
    "brightness": F.adjust_brightness,
    "contrast": F.adjust_contrast,
    "saturation": F.adjust_saturation,
    "hue": F.adjust_hue,
}


def _uniform(g: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _random_box(
    size: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator
) -> tuple[int, int, int, int] | None:
    """A box (top, left, height, width) covering `scale` of the area with a log-uniform aspect ratio,
    as RandomResizedCrop and RandomErasing draw it; None after 10 misses."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = size * size * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= size and 0 < h <= size:
            top = int(torch.randint(0, size - h + 1, (), generator=g))
            left = int(torch.randint(0, size - w + 1, (), generator=g))
            return top, left, h, w
    return None
