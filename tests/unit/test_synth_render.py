"""Properties of the synthetic fundus renderer: determinism, masks, grades, eyes, cameras, the neuro sign."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from shared.data.synth import CAMERA_STYLES, MASK_KEYS, CameraStyle, FundusSpec, Rendered, render_fundus
from shared.data.synth.anatomy import patient_traits
from shared.data.synth.vessels import vasculature

TOPCON = CAMERA_STYLES["topcon"]
H = 96
LESION_KEYS = ("ma", "he", "ex", "se", "nv")


def _render(style: CameraStyle = TOPCON, height: int = H, **fields: object) -> Rendered:
    spec = dict(patient_seed=1, eye_seed=2, eye="left") | fields
    return render_fundus(FundusSpec(**spec), style, height)


def _distance_from_fov_centre(out: Rendered) -> np.ndarray:
    cx, cy, _ = out.fov
    h, w = out.image.shape[:2]
    return np.hypot(np.arange(w)[None, :] - cx, np.arange(h)[:, None] - cy)


def test_same_arguments_give_identical_bytes() -> None:
    a, b = _render(dr_grade=4, mm_grade=2), _render(dr_grade=4, mm_grade=2)
    assert a.image.tobytes() == b.image.tobytes()
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in MASK_KEYS)


def test_another_eye_seed_gives_another_image() -> None:
    assert not np.array_equal(_render(eye_seed=2).image, _render(eye_seed=3).image)


@pytest.mark.parametrize("name", sorted(CAMERA_STYLES))
def test_shapes_dtypes_and_mask_keys(name: str) -> None:
    style = CAMERA_STYLES[name]
    out = _render(style, dr_grade=3)
    shape = (H, round(H * style.aspect))
    assert out.image.shape == (*shape, 3) and out.image.dtype == np.uint8
    assert tuple(out.masks) == MASK_KEYS
    assert all(m.shape == shape and m.dtype == bool for m in out.masks.values())


@pytest.mark.parametrize("name", sorted(CAMERA_STYLES))
def test_masks_lie_inside_the_fov_and_outside_is_black(name: str) -> None:
    out = _render(CAMERA_STYLES[name], dr_grade=4, mm_grade=3)
    dist = _distance_from_fov_centre(out)
    for key, mask in out.masks.items():
        assert not (mask & (dist > out.fov[2] + 1)).any(), key
    assert out.image[dist > out.fov[2] + 1].max() <= 3


def test_grade_zero_has_no_lesions_and_grade_four_has_new_vessels() -> None:
    for seed in range(4):
        healthy = _render(eye_seed=seed, dr_grade=0, mm_grade=seed)
        assert not any(healthy.masks[k].any() for k in LESION_KEYS)
        assert healthy.masks["od"].any()
        assert _render(eye_seed=seed, dr_grade=4).masks["nv"].any()


def test_lesion_burden_grows_with_grade_on_average() -> None:
    def burden(grade: int) -> float:
        outs = [_render(eye_seed=s, dr_grade=grade) for s in range(8)]
        return float(np.mean([sum(out.masks[k].sum() for k in LESION_KEYS) for out in outs]))

    means = [burden(g) for g in range(5)]
    assert means[0] == 0
    assert all(lo < hi for lo, hi in itertools.pairwise(means)), means


def test_haemorrhage_masks_mark_darker_pixels() -> None:
    healthy, sick = _render(height=256, dr_grade=0), _render(height=256, dr_grade=3)
    he = sick.masks["he"]
    assert he.sum() > 20
    assert sick.image[he].astype(float).mean() < healthy.image[he].astype(float).mean() - 10


@pytest.mark.parametrize("eye", ["left", "right"])
def test_disc_lies_on_the_side_of_the_eye(eye: str) -> None:
    for seed in range(3):
        out = _render(eye=eye, eye_seed=seed, mm_grade=seed)
        x_disc = np.nonzero(out.masks["od"])[1].mean()
        assert (x_disc > out.fov[0]) == (eye == "right")


def test_sizes_scale_with_height() -> None:
    small, large = _render(height=64), _render(height=256)
    ratio = large.masks["od"].sum() / small.masks["od"].sum()
    assert 16 * 0.7 < ratio < 16 * 1.3
    assert small.image[32, 32].sum() > 100  # still a lit fundus at 64 px


def test_neuro_changes_the_image_only_subtly() -> None:
    control, neuro = _render(height=128, neuro=False), _render(height=128, neuro=True)
    diff = np.abs(control.image.astype(float) - neuro.image.astype(float)).mean()
    assert 0.0 < diff < 3.0
    assert abs(control.image.mean() - neuro.image.mean()) < 1.0


def test_neuro_effect_is_within_the_spread_between_patients() -> None:
    traits = [patient_traits(np.random.default_rng([seed, 0])) for seed in range(200)]
    shift = np.log(vasculature(traits[0], True, 0).vein_gain / vasculature(traits[0], False, 0).vein_gain)
    spread = np.std([np.log(vasculature(t, False, 0).vein_gain) for t in traits])
    assert 0 < shift < 1.5 * spread


def test_camera_styles_change_colour_statistics() -> None:
    means = {}
    for name, style in CAMERA_STYLES.items():
        out = _render(style, height=128)
        means[name] = out.image[_distance_from_fov_centre(out) < 0.8 * out.fov[2]].mean(axis=0)
    names = sorted(means)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(means[a] - means[b]).max() > 2.0, (a, b)


def test_crop_and_aspect_shape_the_frame() -> None:
    style = dataclasses.replace(TOPCON, fov_radius=0.55, crop_top_bottom=0.1, aspect=1.5)
    out = _render(style, height=100)
    assert out.image.shape == (100, 150, 3)
    cx, cy, r = out.fov
    kept = r * (1 - 2 * 0.1)
    rows = np.abs(np.arange(100) - cy)
    assert out.image[rows > kept + 1].max() <= 3  # cut rows are black
    assert out.image[rows < kept - 1][:, round(cx)].min() > 20  # the centre column is lit up to the cut
    assert out.image[:, :10].max() <= 3 and out.image[:, -10:].max() <= 3  # black side margins


def test_invalid_specs_are_rejected() -> None:
    with pytest.raises(ValueError, match="dr_grade"):
        FundusSpec(0, 0, "left", dr_grade=5)
    with pytest.raises(ValueError, match="eye"):
        FundusSpec(0, 0, "middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="crop_top_bottom"):
        CameraStyle("bad", crop_top_bottom=0.6)
