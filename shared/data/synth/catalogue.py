"""`fedretina synth`: the synthetic sites of a profile, written in their real layouts, plus their site YAMLs.

The natural demo federation is an EyePACS-like DR site, an MMAC-like myopia site and two UK Biobank-like
unlabelled shards (each with its own camera style); beside it an unlabelled EyePACS-like screening pool (the
labelled site's cameras, EyePACS's own grade mix: in-domain images for pretraining), an IDRiD-like lesion-
mask set for the relevance analyses and a Messidor-2-like site (the external test of `fedretina study
seed2`); on request (`--only eyepacs-test`) 625 more EyePACS-like patients, all held out, to score
comparisons on. A dataset already written with the same plan, seed and generator version is kept
(re-running is instant); each site's images depend only on (seed, site name), so `--only` rewrites exactly
what a full run would have written. A folder is only ever replaced if our marker says we wrote it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from shared.data.synth.layouts import WRITERS, Job, render_jobs
from shared.errors import ConfigError, DataError
from shared.rundir import atomic_write_text
from shared.seeding import derive_seed

log = logging.getLogger(__name__)

# Bump when the renderer or a layout writer changes what a (plan, seed) produces, so old folders regenerate.
GENERATOR_VERSION = 4
MARKER = ".synth.json"


@dataclass(frozen=True)
class Plan:
    name: str
    format: str
    count: int  # in the writer's unit: patients (eyepacs), images (mmac), participants (ukb), ...
    height: int
    styles: tuple[str, ...]
    options: tuple[tuple[str, str | None], ...] = ()
    extra: tuple[tuple[str, float], ...] = ()  # further writer arguments (idrid: grading_images)
    on_request: bool = False  # written only when named (`--only`): a large set few runs need


def _sites(scale: float, height: int) -> list[Plan]:
    def n(k: int) -> int:
        return max(4, round(k * scale))

    eyepacs_styles = ("eyepacs-mixed-a", "eyepacs-mixed-b")
    return [
        Plan("eyepacs", "eyepacs", n(300), height, eyepacs_styles, (), (("test_fraction", 0.4),)),
        Plan(
            "eyepacs-pool",
            "eyepacs",
            n(400),
            height,
            eyepacs_styles,
            (("labels", None), ("solution", None), ("unlabelled_dir", "test")),
            (("unlabelled", 1),),
        ),
        Plan("mmac", "mmac", n(480), height, ("mmac",)),
        Plan("ukb-a", "ukb", n(200), height, ("topcon",), (("outcomes", "outcomes.csv"),)),
        Plan(
            "ukb-b",
            "ukb",
            n(200),
            height,
            ("topcon",),
            (("outcomes", "outcomes.csv"),),
            (("first_eid", 2000001),),
        ),
        Plan("idrid", "idrid", n(27), max(height, 256), ("idrid",), (), (("grading_images", n(60)),)),
        Plan("messidor2", "messidor2", n(100), height, ("messidor",)),  # external test site (seed2 study)
        # 625 more EyePACS-like patients, all held out (998 test and 252 validation images at the cpu
        # profile): `compare.test_sites`, for intervals narrow enough to decide +-0.01
        Plan(
            "eyepacs-test",
            "eyepacs",
            n(625),
            height,
            eyepacs_styles,
            (("labels", None),),
            (("test_fraction", 1.0), ("first_id", 100_000)),
            on_request=True,
        ),
    ]


PLANS: dict[str, list[Plan]] = {
    "tiny": _sites(0.05, 96),
    "cpu": _sites(1.0, 192),
    "paper": _sites(10.0, 512),
}


def synthesize(
    profile: str, data_dir: Path, sites_dir: Path, seed: int = 0, workers: int = 2, only: tuple[str, ...] = ()
) -> list[Path]:
    """Write every site of `profile` under `data_dir/<site>/` and its YAML under `sites_dir/`.

    Returns the site YAML paths."""
    plans = selected_plans(profile, only)
    jobs: list[Job] = []
    fresh: list[tuple[Plan, Path]] = []
    for plan in plans:
        root = data_dir / plan.name
        stamp = _stamp(plan, seed)
        marker = root / MARKER
        if marker.exists() and json.loads(marker.read_text()) == stamp:
            log.info("site %s already synthesised at %s", plan.name, root)
            continue
        _clear(root)
        writer = WRITERS[plan.format]
        jobs += writer(
            root, plan.count, derive_seed(seed, plan.name), plan.height, plan.styles, **dict(plan.extra)
        )
        fresh.append((plan, root))
    if jobs:
        log.info(
            "rendering %d synthetic fundus images for %s", len(jobs), ", ".join(p.name for p, _ in fresh)
        )
        render_jobs(jobs, workers)
    for plan, root in fresh:
        atomic_write_text(root / MARKER, json.dumps(_stamp(plan, seed)))
    return [write_site_yaml(plan, data_dir, sites_dir) for plan in plans]


def selected_plans(profile: str, only: tuple[str, ...] = ()) -> list[Plan]:
    """The sites `synthesize` writes: those named in `only`, or every site not written on request only."""
    if profile not in PLANS:
        raise ConfigError(f"--profile: unknown profile {profile!r}; choose one of {', '.join(PLANS)}")
    unknown = sorted(set(only) - {p.name for p in PLANS[profile]})
    if unknown:
        raise ConfigError(
            f"--only: no site {unknown} in the {profile} plan; it has {[p.name for p in PLANS[profile]]}"
        )
    return [p for p in PLANS[profile] if p.name in only or (not only and not p.on_request)]


def _stamp(plan: Plan, seed: int) -> dict:
    """What the marker records, in the form it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps({"plan": asdict(plan), "seed": seed, "version": GENERATOR_VERSION}))


def _clear(root: Path) -> None:
    """Remove a previous synthetic site; refuse a non-empty folder we did not write (it may be real data)."""
    if not root.exists():
        return
    if not (root / MARKER).exists() and any(root.iterdir()):
        raise DataError(
            f"{root}: not empty and not written by `fedretina synth` (no {MARKER}); "
            "choose another --data-dir or move the folder away"
        )
    shutil.rmtree(root)


def write_site_yaml(plan: Plan, data_dir: Path, sites_dir: Path) -> Path:
    """`sites_dir/<name>.yaml` pointing at the data (paths relative to the YAML, so the tree can move)."""
    sites_dir.mkdir(parents=True, exist_ok=True)
    root = (data_dir / plan.name).resolve()
    state = (data_dir.parent / "state" / plan.name).resolve()
    site = {
        "name": plan.name,
        "format": plan.format,
        "root": _relative(root, sites_dir.resolve()),
        "state_dir": _relative(state, sites_dir.resolve()),
        "options": dict(plan.options),
    }
    path = sites_dir / f"{plan.name}.yaml"
    cameras = ", ".join(plan.styles)
    header = f"# synthetic {plan.format}-layout site written by `fedretina synth`; camera {cameras}\n"
    atomic_write_text(path, header + yaml.safe_dump(site, sort_keys=False))
    return path


def _relative(target: Path, base: Path) -> str:
    return os.path.relpath(target, base)
