"""Generator and pipeline throughput at the cpu profile (2 processes where the product uses 2)."""

from __future__ import annotations

import time
from pathlib import Path

from torch.utils.data import DataLoader

from shared.config import load_config
from shared.data.cache import ImageCache
from shared.data.dataset import FundusDataset
from shared.data.formats import read_site
from shared.data.fundus import preprocess
from shared.data.site import load_site_config
from shared.data.synth.layouts import render_jobs, write_eyepacs
from shared.data.synth.population import DR_WEIGHTS, people
from shared.data.synth.render import CAMERA_STYLES, render_fundus
from shared.data.synth.sites import PLANS
from tests.conftest import site_yaml


def run(out: Path) -> dict:
    cfg = load_config(profile="cpu")
    height = next(p.height for p in PLANS["cpu"] if p.name == "eyepacs")
    size = cfg.data.image_size
    result: dict = {}
    spec = people(1, 0, dr=DR_WEIGHTS)[0].spec("left")
    for h in (128, height, 256):
        t = time.perf_counter()
        for _ in range(20):
            render_fundus(spec, CAMERA_STYLES["eyepacs-mixed-a"], h)
        result[f"render_ms_per_image_{h}px_1proc"] = 1000 * (time.perf_counter() - t) / 20
    root = out / "eyepacs"
    jobs = write_eyepacs(root, 200, 0, height, ("eyepacs-mixed-a", "eyepacs-mixed-b"))
    t = time.perf_counter()
    render_jobs(jobs, workers=2)
    result[f"generator_images_per_s_{height}px_2proc"] = len(jobs) / (time.perf_counter() - t)
    site = load_site_config(site_yaml(out, "eyepacs", root))
    rows = read_site(site).manifest
    t = time.perf_counter()
    for path in rows.path[:100]:
        preprocess(Path(path), size)
    result[f"decode_crop_images_per_s_{size}px_1proc"] = 100 / (time.perf_counter() - t)
    cache = ImageCache(out / "cache", size)
    t = time.perf_counter()
    cache.ensure(rows, workers=2)
    result[f"cache_build_images_per_s_{size}px_2proc"] = len(rows) / (time.perf_counter() - t)
    for recipe in ("light", "heavy"):
        dataset = FundusDataset(rows, size, recipe, cache=cache)
        loader = DataLoader(dataset, batch_size=16, shuffle=False, num_workers=2)
        t, n = time.perf_counter(), 0
        for batch in loader:
            n += batch["image"].shape[0]
        result[f"augmented_images_per_s_{recipe}_{size}px_2workers"] = n / (time.perf_counter() - t)
    direct = FundusDataset(rows.head(100), size, "heavy")
    t = time.perf_counter()
    for i in range(len(direct)):
        direct[i]
    result[f"uncached_heavy_images_per_s_{size}px_1proc"] = len(direct) / (time.perf_counter() - t)
    result["cache_speedup"] = (
        result[f"augmented_images_per_s_heavy_{size}px_2workers"]
        / result[f"uncached_heavy_images_per_s_{size}px_1proc"]
    )
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
