"""The lesion images relevance is scored on: an IDRiD-layout site's segmentation images, each cropped to its
field of view exactly as the cache crops it, with its microaneurysm, haemorrhage and hard-exudate masks
(and their union) through the same crop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from shared.data.fundus import FieldOfView, crop_to_fov, find_fov
from shared.data.images import ImageProblem, decode
from shared.data.manifest import MASK_PREFIX
from shared.data.site import Site
from shared.errors import ConfigError, DataError

LESIONS = ("ma", "he", "ex")  # microaneurysms, haemorrhages, hard exudates: the paper's three
UNION = "union"


@dataclass(frozen=True)
class LesionImage:
    """A segmentation image at the models' input size and its lesion masks, cropped alike."""

    image_id: str
    rgb: np.ndarray  # uint8 (S, S, 3): the FOV crop, as the site's cache holds it
    masks: dict[str, np.ndarray | None]  # ma, he, ex, union: bool (S, S), None when not annotated


def segmentation_rows(site: Site, split: str | None, limit: int | None) -> pd.DataFrame:
    """The site's segmentation rows (any mask_* path: MA, HE, EX, SE or OD) of `split` (all when None),
    sorted by image id, the first `limit` of them."""
    columns = [c for c in site.rows.columns if c.startswith(MASK_PREFIX)]
    if not columns:
        raise ConfigError(
            f"site {site.name} holds no lesion masks ({', '.join(MASK_PREFIX + x for x in LESIONS)}); "
            "give an IDRiD-layout site with its segmentation part, e.g. --site sites/generated/idrid.yaml"
        )
    masked = site.rows[(site.rows[columns] != "").any(axis=1)]
    if split is not None:
        masked = masked[masked["split"] == split]
    if masked.empty:
        raise ConfigError(f"--split {split}: site {site.name} has no images with lesion masks in that split")
    masked = masked.sort_values("image_id", kind="stable")
    return masked.head(limit) if limit else masked


def lesion_image(row: dict, size: int) -> LesionImage:
    """The image cropped to its field of view exactly as the cache crops it (decoded as `preprocess`
    decodes it, `find_fov`, `crop_to_fov`), and its MA, HE, EX masks and their union through the same crop:
    each mask resized to the decoded image (nearest neighbour), cropped by `crop_to_fov` with the image's
    own FOV, and thresholded at half intensity."""
    path = Path(row["path"])
    try:
        decoded = decode(path, draft=2 * size)
        fov = find_fov(decoded.rgb)
    except ImageProblem as exc:
        raise DataError(f"{path}: {exc.reason}; run `fedretina site check` to exclude it") from None
    rgb, _ = crop_to_fov(decoded.rgb, fov, size)
    height, width = decoded.rgb.shape[:2]
    sources = {
        lesion: _read_mask(Path(p), (width, height))
        for lesion in LESIONS
        if (p := row.get(f"{MASK_PREFIX}{lesion}", ""))
    }
    masks: dict[str, np.ndarray | None] = {
        lesion: crop_mask(sources[lesion], fov, size) if lesion in sources else None for lesion in LESIONS
    }
    union = np.logical_or.reduce(list(sources.values())) if sources else None
    masks[UNION] = crop_mask(union, fov, size) if union is not None else None
    return LesionImage(str(row["image_id"]), rgb, masks)


def crop_mask(mask: np.ndarray, fov: FieldOfView, size: int) -> np.ndarray:
    """A bool mask at the decoded image's size through the image's FOV crop: (size, size) bool."""
    grey = np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2)
    cropped, _ = crop_to_fov(grey, fov, size)
    return cropped[..., 0] >= 128


def _read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A lesion mask file (any channel nonzero = lesion) at `size` (width, height), nearest neighbour."""
    try:
        with Image.open(path) as img:
            img.load()
            binary = Image.fromarray((np.asarray(img).reshape(img.height, img.width, -1) > 0).any(axis=2))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read this lesion mask ({exc})") from None
    return np.asarray(binary.resize(size, Image.NEAREST))
