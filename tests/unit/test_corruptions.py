"""ImageNet-C corruptions: reproducible from the seed, the caller's numpy stream untouched, shape and dtype
kept for every corruption and severity, and strength growing with the severity on a real fundus."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from shared.analysis.corruptions import CORRUPTIONS, SEVERITIES, corrupt, corruption_strength

RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "elastic_transform")
# The 11 corruptions whose strength grows with the severity, measured on the retina below (seeds 0-2).
MONOTONE = (
    "gaussian_noise",  # 14.3 -> 55.5
    "shot_noise",  # 13.0 -> 50.3
    "impulse_noise",  # 3.8 -> 34.4
    "defocus_blur",  # 4.5 -> 10.8
    "motion_blur",  # 5.4 -> 19.4
    "zoom_blur",  # 9.0 -> 17.6
    "brightness",  # 13.0 -> 35.7
    "contrast",  # 25.3 -> 39.8
    "elastic_transform",  # 4.1 -> 8.5
    "pixelate",  # 2.3 -> 5.1
    "jpeg_compression",  # 5.1 -> 9.4
)


@pytest.fixture(scope="module")
def retina() -> np.ndarray:
    """scikit-image's real fundus (1411 px, offline, CC0) at 128 x 128."""
    return np.asarray(Image.fromarray(data.retina()).resize((128, 128), Image.BILINEAR))


def test_there_are_the_15_benchmark_corruptions() -> None:
    assert (
        len(CORRUPTIONS) == 15
        and CORRUPTIONS[0] == "gaussian_noise"
        and CORRUPTIONS[-1] == "jpeg_compression"
    )


def test_the_same_seed_gives_the_same_bytes(retina: np.ndarray) -> None:
    for name in CORRUPTIONS:
        assert np.array_equal(corrupt(retina, name, 3, seed=7), corrupt(retina, name, 3, seed=7)), name


@pytest.mark.parametrize("name", RANDOM)
def test_another_seed_gives_another_image(retina: np.ndarray, name: str) -> None:
    assert not np.array_equal(corrupt(retina, name, 3, seed=7), corrupt(retina, name, 3, seed=8))


def test_numpys_global_stream_is_left_as_it_was(retina: np.ndarray) -> None:
    np.random.seed(123)
    expected = np.random.random(4)
    np.random.seed(123)
    for name in CORRUPTIONS:
        corrupt(retina, name, 1, seed=0)
    assert np.array_equal(np.random.random(4), expected)


@pytest.mark.parametrize("shape", [(40, 72, 3), (72, 40, 3)])
def test_every_corruption_and_severity_keeps_shape_and_dtype(shape: tuple[int, int, int]) -> None:
    image = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    for name in CORRUPTIONS:
        for severity in SEVERITIES:
            out = corrupt(image, name, severity, seed=severity)
            assert (out.shape, out.dtype) == (shape, np.uint8), (name, severity)


def test_strength_grows_with_severity_where_the_table_says_so(retina: np.ndarray) -> None:
    strength = corruption_strength([retina], names=MONOTONE)
    for name, curve in strength.items():
        assert (np.diff(curve) > 0).all(), (name, curve)
    assert strength["gaussian_noise"][0] == pytest.approx(14.3, abs=1.0)
    assert strength["gaussian_noise"][-1] == pytest.approx(55.5, abs=1.5)
    assert strength["contrast"] == pytest.approx([25.3, 29.4, 33.5, 37.7, 39.8], abs=0.5)  # no randomness
    assert strength["pixelate"][-1] == pytest.approx(5.1, abs=0.3)


def test_bad_input_is_refused_with_the_argument_named(retina: np.ndarray) -> None:
    with pytest.raises(ValueError, match="name: unknown corruption 'gaussian'"):
        corrupt(retina, "gaussian", 1, seed=0)
    with pytest.raises(ValueError, match="severity: 6"):
        corrupt(retina, "contrast", 6, seed=0)
    with pytest.raises(
        ValueError, match=r"image: expected an \(H, W, 3\) uint8 array, got \(128, 128, 3\) float64"
    ):
        corrupt(retina / 255.0, "contrast", 1, seed=0)
    with pytest.raises(ValueError, match="image: 16x16 is too small"):
        corrupt(retina[:16, :16], "contrast", 1, seed=0)
