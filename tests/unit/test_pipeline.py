"""The image pipeline: field-of-view crop against known geometry, augmentation properties, and the cache
giving exactly what direct decoding gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from shared.data import transforms as T
from shared.data.cache import ImageCache
from shared.data.checks import read_site
from shared.data.dataset import EpochSampler, FundusDataset
from shared.data.fundus import crop_to_fov, find_fov, preprocess
from shared.data.site_config import load_site_config
from shared.data.synth.render import CAMERA_STYLES, FundusSpec, render_fundus


@pytest.mark.parametrize("style", ["topcon", "eyepacs-mixed-a", "eyepacs-mixed-b", "idrid"])
def test_fov_is_found_where_the_camera_put_it(style: str) -> None:
    out = render_fundus(FundusSpec(3, 4, "left", dr_grade=2), CAMERA_STYLES[style], 256)
    cx, cy, r = out.fov
    found = find_fov(out.image)
    assert abs(found.cx - cx) < 0.03 * r and abs(found.cy - cy) < 0.03 * r
    assert abs(found.r - r) < 0.03 * r  # cut-top/bottom frames: the width still gives the diameter


def test_real_photograph_and_its_inverted_copy_crop_consistently() -> None:
    photo = skdata.retina()
    upright, fov_up = crop_to_fov(photo, find_fov(photo), 128)
    flipped = np.ascontiguousarray(photo[::-1, ::-1])
    inverted, fov_inv = crop_to_fov(flipped, find_fov(flipped), 128)
    assert abs(fov_up.mean() - np.pi / 4) < 0.02  # the retina fills the inscribed disc
    agree = (fov_up == fov_inv[::-1, ::-1]).mean()
    assert agree > 0.98
    diff = np.abs(upright.astype(int) - inverted[::-1, ::-1].astype(int))[fov_up & fov_inv[::-1, ::-1]]
    assert np.median(diff) <= 8  # same crop up to a pixel of resampling


def test_crop_is_black_outside_the_fov(tmp_path: Path) -> None:
    out = render_fundus(FundusSpec(1, 1, "right"), CAMERA_STYLES["eyepacs-mixed-a"], 192)
    path = tmp_path / "x.jpeg"
    Image.fromarray(out.image).save(path, quality=80)
    pre = preprocess(path, 96)
    assert pre.rgb.shape == (96, 96, 3) and pre.fov.dtype == bool
    assert (pre.rgb[~pre.fov] == 0).all()
    assert 0.6 < pre.fov.mean() < 0.8  # a disc with its top and bottom cut off


@pytest.mark.parametrize("recipe", ["light", "heavy", "moco"])
def test_augmentation_is_reproducible_from_its_generator_and_moves_the_fov_with_the_image(
    recipe: str,
) -> None:
    image = torch.rand(3, 64, 64)
    fov = torch.zeros(1, 64, 64, dtype=torch.bool)
    fov[:, :, :32] = True  # left half
    a = T.draw(recipe, 64, 64, torch.Generator().manual_seed(5))
    b = T.draw(recipe, 64, 64, torch.Generator().manual_seed(5))
    assert a == b
    x1, f1 = T.apply(image, fov, a, 64)
    x2, f2 = T.apply(image, fov, b, 64)
    assert torch.equal(x1, x2) and torch.equal(f1, f2)
    flip = T.Params((0, 0, 64, 64), hflip=True)
    _, flipped = T.apply(image, fov, flip, 64)
    assert flipped[:, :, 32:].all() and not flipped[:, :, :32].any()


def test_recipes_draw_within_their_documented_ranges() -> None:
    g = torch.Generator().manual_seed(0)
    heavy = [T.draw("heavy", 128, 128, g) for _ in range(300)]
    areas = [p.crop[2] * p.crop[3] / 128**2 for p in heavy]
    assert min(areas) >= 0.07 and max(areas) <= 1.0 and min(areas) < 0.2
    assert all(-180 <= p.angle <= 180 for p in heavy) and any(p.vflip for p in heavy)
    hues = [f for p in heavy for op, f in p.jitter if op == "hue"]
    assert min(hues) >= -0.4 and max(hues) <= 0.4 and max(hues) > 0.3
    assert 0.3 < np.mean([p.erase is not None for p in heavy]) < 0.5  # random erasing, p = 0.4
    light = [T.draw("light", 128, 128, g) for _ in range(200)]
    assert min(p.crop[2] * p.crop[3] / 128**2 for p in light) >= 0.66
    assert not any(p.vflip or p.angle or p.jitter for p in light)
    moco = [T.draw("moco", 224, 224, g) for _ in range(400)]
    assert 0.72 < np.mean([bool(p.jitter) for p in moco]) < 0.88  # MoCo v2: jitter p 0.8
    assert 0.12 < np.mean([p.gray for p in moco]) < 0.28  # grayscale p 0.2
    sigmas = [p.blur for p in moco if p.blur]
    assert 0.4 < len(sigmas) / len(moco) < 0.6 and min(sigmas) >= 0.1 and max(sigmas) <= 2.0
    assert not any(p.gray or p.blur for p in [T.draw("contrastive", 224, 224, g) for _ in range(100)])


def test_moco_grayscale_and_blur_act_on_the_image() -> None:
    image = torch.rand(3, 64, 64)
    fov = torch.ones(1, 64, 64, dtype=torch.bool)
    gray, _ = T.apply(image, fov, T.Params((0, 0, 64, 64), gray=True), 64)
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    blurred, _ = T.apply(image, fov, T.Params((0, 0, 64, 64), blur=1.5), 64)
    assert blurred.std() < 0.5 * image.std() and abs(blurred.mean() - image.mean()) < 0.02


def test_cache_gives_exactly_what_decoding_gives_and_only_processes_new_files(
    tiny_sites: dict[str, Path],
) -> None:
    site = load_site_config(tiny_sites["aptos"])
    rows = read_site(site).manifest
    cache = ImageCache(site.state_root / "cache-test", 64)
    cache.ensure(rows.iloc[:5], workers=1)
    stored = [(cache.dir / name).stat().st_mtime_ns for name in ("index.json", "images.npy", "fov.npy")]
    cache.ensure(rows.iloc[:5], workers=1)
    again = [(cache.dir / name).stat().st_mtime_ns for name in ("index.json", "images.npy", "fov.npy")]
    assert again == stored  # nothing redone, nothing rewritten
    cache.ensure(rows, workers=2)  # grows, in parallel
    cached = FundusDataset(rows, 64, "heavy", cache=cache)
    direct = FundusDataset(rows, 64, "heavy")
    for ds in (cached, direct):
        ds.set_epoch_seed(11)
    for i in range(len(rows)):
        a, b = cached[i], direct[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["fov"], b["fov"])


def test_epoch_seed_fixes_augmentations_and_order(tiny_sites: dict[str, Path]) -> None:
    site = load_site_config(tiny_sites["mmac"])
    ds = FundusDataset(read_site(site).manifest, 64, "heavy", task="mmac")
    ds.set_epoch_seed(1)
    first = ds[3]["image"]
    ds.set_epoch_seed(2)
    assert not torch.equal(first, ds[3]["image"])
    ds.set_epoch_seed(1)
    assert torch.equal(first, ds[3]["image"])
    assert ds[3]["label"].item() in range(5)
    assert list(EpochSampler(10, 4)) == list(EpochSampler(10, 4)) != list(EpochSampler(10, 5))
    assert sorted(EpochSampler(10, 4)) == list(range(10))
