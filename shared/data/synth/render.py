"""Render one synthetic fundus photograph with its lesion masks: the public entry point of `synth`.

Painting order follows the layers of the eye, back to front: choroid and RPE, macular pigment, myopic
atrophy, optic disc, retinal vessels, what mimics DR (drusen, pigment, lens dust), DR lesions; then the
camera. Each concern draws from its own generator seeded by (patient, eye, purpose), so changing the DR grade
keeps the vessels and the mimics, changing the camera keeps the eye, and the same arguments always give
identical bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from shared.data.synth.anatomy import (
    Layout,
    Traits,
    eye_layout,
    paint_background,
    paint_disc,
    paint_macula,
    patient_traits,
)
from shared.data.synth.camera import CAMERA_STYLES, CameraStyle, canvas_for, photograph
from shared.data.synth.lesions import LESIONS, paint_lesions, venous_beading
from shared.data.synth.mimics import paint_mimics
from shared.data.synth.myopia import paint_myopia
from shared.data.synth.raster import Canvas
from shared.data.synth.vessels import Branch, Vasculature, grow_tree, paint_vessels, vasculature

__all__ = ["CAMERA_STYLES", "MASK_KEYS", "CameraStyle", "FundusSpec", "Rendered", "render_fundus"]

MASK_KEYS = (*LESIONS, "od")
_PATIENT, _LAYOUT, _TEXTURE, _MYOPIA, _VESSELS, _LESIONS, _CAMERA, _MIMICS = range(8)


@dataclass(frozen=True)
class FundusSpec:
    """One eye of one patient. Seeds must be non-negative."""

    patient_seed: int  # traits both eyes share: pigmentation, vessel calibre and tortuosity, disc size
    eye_seed: int  # per-eye randomness: exact vessel layout, lesion positions
    eye: Literal["left", "right"]  # right eye: disc on the right of the image (nasal side)
    dr_grade: int = 0  # ICDR 0-4
    mm_grade: int = 0  # META-PM myopic maculopathy 0-4
    neuro: bool = False  # AD/PD-like: wider venules, narrower arterioles, more tortuous, sparser (subtle)

    def __post_init__(self) -> None:
        if self.eye not in ("left", "right"):
            raise ValueError(f"eye must be 'left' or 'right', got {self.eye!r}")
        if self.dr_grade not in range(5) or self.mm_grade not in range(5):
            raise ValueError(f"dr_grade and mm_grade must be in 0-4, got {self.dr_grade}, {self.mm_grade}")
        if self.patient_seed < 0 or self.eye_seed < 0:
            raise ValueError(f"seeds must be non-negative, got {self.patient_seed}, {self.eye_seed}")


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray  # uint8 (H, W, 3) RGB
    masks: dict[str, np.ndarray]  # bool (H, W) for each of MASK_KEYS, all-False where absent
    fov: tuple[float, float, float]  # (cx, cy, r) of the circular field of view, px


def render_fundus(spec: FundusSpec, style: CameraStyle, height: int) -> Rendered:
    """Deterministic: the same arguments give bitwise identical output.

    Sizes scale with `height` (64 to 1024 px work); the width is `height * style.aspect` rounded. A 256-px
    image takes about 20 ms on one core, a 512-px one about 65 ms.
    """
    if height < 16:
        raise ValueError(f"height must be at least 16 px, got {height}")

    stream = _streams(spec)
    canvas, traits, layout, vasc, tree = eye_anatomy(spec, style, height)
    img = paint_background(canvas, traits, layout, stream(_TEXTURE))
    paint_macula(img, canvas, layout)
    paint_myopia(img, canvas, layout, spec.mm_grade, stream(_MYOPIA))
    disc = paint_disc(img, canvas, layout)
    lesion_rng = stream(_LESIONS)
    paint_vessels(img, canvas, tree, vasc, venous_beading(tree, spec.dr_grade, lesion_rng))
    paint_mimics(img, canvas, layout, stream(_MIMICS))
    masks = paint_lesions(img, canvas, layout, tree, spec.dr_grade, lesion_rng)
    masks["od"] = disc
    fov = canvas.fov()
    image = photograph(img, canvas, style, fov, stream(_CAMERA))
    inside = fov > 0.5
    return Rendered(
        image=image,
        masks={key: masks[key] & inside for key in MASK_KEYS},
        fov=(canvas.cx, canvas.cy, canvas.r),
    )


def eye_anatomy(
    spec: FundusSpec, style: CameraStyle, height: int
) -> tuple[Canvas, Traits, Layout, Vasculature, list[Branch]]:
    """The eye `render_fundus` paints, before any paint: its canvas, the patient's traits, the eye's layout,
    the vessel factors and the grown vessel tree (what `shared/data/synth/evidence.py` measures)."""
    stream = _streams(spec)
    canvas = canvas_for(style, height, mirror=spec.eye == "right")
    traits = patient_traits(np.random.default_rng([spec.patient_seed, _PATIENT]))
    layout = eye_layout(traits, spec.mm_grade, stream(_LAYOUT))
    vasc = vasculature(traits, spec.neuro, spec.mm_grade)
    tree = grow_tree(layout, vasc, int(stream(_VESSELS).integers(2**63)), canvas.r)
    return canvas, traits, layout, vasc, tree


def _streams(spec: FundusSpec) -> Callable[[int], np.random.Generator]:
    """One generator per concern, keyed by (patient, eye, purpose)."""

    def stream(purpose: int) -> np.random.Generator:
        return np.random.default_rng([spec.patient_seed, spec.eye_seed, int(spec.eye == "right"), purpose])

    return stream
