"""Server-side evaluation on PUBLIC images only: scikit-image's real fundus photograph and a few synthetic
fundi the server renders itself. No site image is ever needed (or available) here.

Phase 1: the masked-reconstruction loss of the global SparK model on the probe set (eval mode, fixed masks)
and a reconstruction PNG per round.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from skimage import data as skdata

from shared.data.fundus import crop_to_fov, find_fov
from shared.data.synth.render import CAMERA_STYLES, FundusSpec, render_fundus
from shared.data.transforms import FUNDUS_MEAN, FUNDUS_STD, normalise
from shared.spark.preview import save_preview
from shared.spark.spark import SparK

# (dr grade, myopic grade, eye, camera): one of each kind of picture the sites hold.
SYNTHETIC = (
    (0, 0, "left", "topcon"),
    (2, 0, "right", "eyepacs-mixed-a"),
    (4, 0, "left", "eyepacs-mixed-b"),
    (0, 3, "right", "mmac"),
    (3, 0, "right", "idrid"),
)
MASK_SEED = 20251


def probe_batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised images (N, 3, S, S), FOV masks (N, 1, S, S)): the real photograph first."""
    pictures = [skdata.retina()]
    for k, (dr, mm, eye, camera) in enumerate(SYNTHETIC):
        spec = FundusSpec(patient_seed=1000 + k, eye_seed=2000 + k, eye=eye, dr_grade=dr, mm_grade=mm)  # type: ignore[arg-type]
        pictures.append(render_fundus(spec, CAMERA_STYLES[camera], 2 * size).image)
    images, fovs = [], []
    for rgb in pictures:
        crop, fov = crop_to_fov(np.ascontiguousarray(rgb[..., :3]), find_fov(rgb[..., :3]), size)
        images.append(
            normalise(torch.from_numpy(crop).permute(2, 0, 1).float() / 255.0, FUNDUS_MEAN, FUNDUS_STD)
        )
        fovs.append(torch.from_numpy(fov)[None])
    return torch.stack(images), torch.stack(fovs)


@torch.no_grad()
def probe_spark(model: SparK, images: torch.Tensor, fov: torch.Tensor, png: Path | None) -> float:
    """Masked-patch loss of `model` on the probe set with fixed masks; optionally the reconstruction PNG."""
    model.eval()
    mask = model.draw_mask(images, torch.Generator().manual_seed(MASK_SEED))
    loss, _, _ = model(images, mask, fov=fov)
    if png is not None:
        save_preview(png, model, images, FUNDUS_MEAN, FUNDUS_STD, seed=MASK_SEED)
    return float(loss)
