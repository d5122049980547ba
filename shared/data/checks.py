"""`fedretina site check`: validate a site and write its report, excluding what cannot be used.

Reads the site's layout (format reader), decodes every listed image, and reports: counts, label histogram
per task, size / channel / bit-depth distributions, FOV colour statistics, undecodable, truncated and
zero-byte files, duplicates by content hash, conflicting labels, out-of-range labels, missing and unnamed
files. Recoverable problems exclude only the file concerned (counted and listed, never silently dropped);
fatal ones make the site unusable. Everything is written into one report folder and nowhere else:
`report.json`, `summary.txt` and `manifest.csv` (the usable images, which training then reads).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shared.config import validate
from shared.data.formats import FORMATS
from shared.data.formats.common import Problem, drop_eye_conflicts
from shared.data.fundus import preprocess
from shared.data.images import ImageProblem
from shared.data.manifest import (
    empty_manifest,
    label_tasks,
    new_manifest,
    read_manifest_csv,
    write_manifest_csv,
)
from shared.data.site_config import SiteConfig
from shared.errors import ConfigError, DataError
from shared.logs import progress
from shared.rundir import atomic_write_text

log = logging.getLogger(__name__)
STATS_SIZE = 64  # colour statistics are taken on a small FOV crop


@dataclass(frozen=True)
class ImageFacts:
    size: str = ""
    mode: str = ""
    bits: int = 0
    channels: int = 0
    sha1: str = ""
    note: str = ""
    kind: str = ""  # problem kind when the image is unusable
    reason: str = ""
    sums: tuple[float, ...] = ()  # per-channel sum and sum of squares over FOV pixels, and the pixel count


@dataclass(frozen=True)
class CheckResult:
    report: dict[str, Any]
    manifest: pd.DataFrame
    problems: tuple[Problem, ...]
    text: str  # the readable summary written to summary.txt

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]


@dataclass(frozen=True)
class SiteData:
    manifest: pd.DataFrame
    problems: tuple[Problem, ...]
    tasks: dict[str, int]

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]


def read_site(site: SiteConfig) -> SiteData:
    """List the site's images into a manifest; nothing is decoded here."""
    reader = FORMATS[site.format]
    options = validate(reader.options, site.options, f"{site.source or site.name}: options")
    rows = reader.read(site.root, options)
    drop_eye_conflicts(rows)
    manifest = new_manifest(rows.rows, site.name, rows.tasks) if rows.rows else empty_manifest(site.name)
    return SiteData(manifest, tuple(rows.problems), dict(rows.tasks))


def check_site(site: SiteConfig, out_dir: Path | None = None, workers: int = 2) -> CheckResult:
    """Check `site` and write report.json, summary.txt and manifest.csv into `out_dir` (default: the site's
    `<state_dir>/check/`). Returns the result; fatal problems are in `result.fatal`."""
    out_dir = out_dir or site.check_dir
    if out_dir.resolve().is_relative_to(site.root.resolve()):
        raise ConfigError(f"--out: {out_dir} is inside the dataset {site.root}; a site never writes there")
    data = read_site(site)
    problems = list(data.problems)
    manifest = data.manifest
    facts = _inspect(manifest, workers)
    bad: set[str] = set()
    for image_id, path, fact in zip(manifest["image_id"], manifest["path"], facts, strict=True):
        where = _rel(site.root, path)
        if fact.kind:
            problems.append(Problem(fact.kind, where, fact.reason))
            bad.add(image_id)
        elif fact.note:
            problems.append(Problem("converted", where, fact.note, excluded=False))
    bad |= _duplicates(manifest, facts, site.root, problems)
    usable = manifest[~manifest["image_id"].isin(bad)].reset_index(drop=True)
    _verdict(site, manifest, usable, problems)
    report = _report(site, usable, facts, problems, listed=len(manifest))
    text = summary(report, problems)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out_dir / "summary.txt", text)
    write_manifest_csv(usable, out_dir / "manifest.csv")
    return CheckResult(report, usable, tuple(problems), text)


def load_checked_manifest(site: SiteConfig) -> pd.DataFrame:
    """The usable images of a site: its last check's manifest.csv, or (unchecked) the reader's listing."""
    checked, report = site.check_dir / "manifest.csv", site.check_dir / "report.json"
    if checked.exists():
        if report.exists() and json.loads(report.read_text()).get("verdict") == "unusable":
            raise DataError(
                f"{site.name}: its last check found it unusable ({site.check_dir / 'summary.txt'}); "
                f"fix what it lists and run `fedretina site check {site.source or ''}` again"
            )
        return read_manifest_csv(checked)
    log.warning("site %s has not been checked; run `fedretina site check %s`", site.name, site.source or "")
    data = read_site(site)
    if data.fatal:
        raise DataError(data.fatal[0].line())
    return data.manifest


def _inspect(manifest: pd.DataFrame, workers: int) -> list[ImageFacts]:
    paths = manifest["path"].tolist()
    if workers > 1 and len(paths) > 8:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(progress(pool.map(_facts, paths, chunksize=16), "checking images", len(paths), "img"))
    return [_facts(p) for p in progress(paths, "checking images", len(paths), "img")]


def _facts(path: str) -> ImageFacts:
    raw = Path(path).read_bytes()
    sha1 = hashlib.sha1(raw).hexdigest()
    try:
        pre = preprocess(Path(path), STATS_SIZE)
    except ImageProblem as exc:
        return ImageFacts(sha1=sha1, kind=exc.kind, reason=exc.reason)
    src = pre.source
    pixels = pre.rgb[pre.fov].astype(np.float64) / 255.0
    sums = (*pixels.sum(axis=0), *(pixels**2).sum(axis=0), float(len(pixels)))
    return ImageFacts(
        size=f"{src.size[0]}x{src.size[1]}",
        mode=src.mode,
        bits=src.bits,
        channels=src.channels,
        sha1=sha1,
        note=src.note,
        sums=tuple(float(s) for s in sums),
    )


def _duplicates(
    manifest: pd.DataFrame, facts: list[ImageFacts], root: Path, problems: list[Problem]
) -> set[str]:
    """Identical files under different names: keep the first (by image id), exclude the rest."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for image_id, path, fact in zip(manifest["image_id"], manifest["path"], facts, strict=True):
        if fact.sha1 and not fact.kind:
            groups.setdefault(fact.sha1, []).append((image_id, path))
    dropped: set[str] = set()
    for members in groups.values():
        keep, *rest = sorted(members)
        for image_id, path in rest:
            reason = f"same content as {_rel(root, keep[1])}; excluded so it cannot leak across folds"
            problems.append(Problem("duplicate", _rel(root, path), reason))
            dropped.add(image_id)
    return dropped


def excluded_files(problems: list[Problem]) -> set[str]:
    """Image files excluded by a recoverable problem, each once however many problems it has (a row that is
    no file name at all, `bad-name`, has no file to count)."""
    return {p.file for p in problems if p.excluded and not p.fatal and p.kind != "bad-name"}


def _verdict(site: SiteConfig, listed: pd.DataFrame, usable: pd.DataFrame, problems: list[Problem]) -> None:
    """Site-level fatal problems: nothing usable, or more excluded than the site allows."""
    excluded = excluded_files(problems)
    in_manifest = {_rel(site.root, p) for p in listed["path"]}
    total = len(listed) + len(excluded - in_manifest)  # readers drop some before the manifest
    share = len(excluded) / total if total else 0.0
    if usable.empty and not any(p.fatal for p in problems):
        problems.append(Problem("empty", str(site.root), "no usable images found", fatal=True))
    elif share > site.max_excluded_fraction:
        reason = (
            f"{len(excluded)} of {total} images excluded ({share:.0%}), more than max_excluded_fraction "
            f"{site.max_excluded_fraction:.0%}; fix the files above or raise the limit in the site YAML"
        )
        problems.append(Problem("too-many-excluded", str(site.source or site.root), reason, fatal=True))


def _report(
    site: SiteConfig, usable: pd.DataFrame, facts: list[ImageFacts], problems: list[Problem], listed: int
) -> dict[str, Any]:
    good = [f for f in facts if not f.kind]
    sums = np.array([f.sums for f in good]).sum(axis=0) if good else np.zeros(7)
    count = max(sums[6], 1.0)
    mean = sums[:3] / count
    std = np.sqrt(np.maximum(sums[3:6] / count - mean**2, 0.0))
    return {
        "site": site.name,
        "format": site.format,
        "root": str(site.root),
        "checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "verdict": "unusable" if any(p.fatal for p in problems) else "usable",
        "counts": {
            "listed": listed,
            "usable": len(usable),
            "excluded": len(excluded_files(problems)),
            "notes": sum(1 for p in problems if not p.excluded),
            "patients": int(usable["patient_id"].nunique()),
            "by_split": {k or "none": int(v) for k, v in Counter(usable["split"]).items()},
            "by_eye": {k or "unknown": int(v) for k, v in Counter(usable["eye"]).items()},
        },
        "labels": {
            t.name: {
                str(k): int(v) for k, v in sorted(Counter(usable[t.column].dropna().astype(int)).items())
            }
            for t in label_tasks(usable)
        },
        "images": {
            "sizes": dict(Counter(f.size for f in good).most_common()),
            "modes": dict(Counter(f.mode for f in good)),
            "bit_depths": {str(k): v for k, v in Counter(f.bits for f in good).items()},
            "channels": {str(k): v for k, v in Counter(f.channels for f in good).items()},
            "fov_mean_rgb": [round(float(x), 4) for x in mean],
            "fov_std_rgb": [round(float(x), 4) for x in std],
        },
        "problems": [asdict(p) for p in problems],
    }


def summary(report: dict[str, Any], problems: list[Problem]) -> str:
    """The report as text a person reads first: verdict, counts, histograms, then every problem."""
    c, img = report["counts"], report["images"]
    lines = [
        f"site {report['site']} ({report['format']}) at {report['root']}: {report['verdict'].upper()}",
        f"  images listed {c['listed']}, usable {c['usable']}, excluded {c['excluded']}, notes {c['notes']}; "
        f"patients {c['patients']}",
        f"  splits {c['by_split']}; eyes {c['by_eye']}",
    ]
    for task, hist in report["labels"].items():
        total = max(sum(hist.values()), 1)
        lines.append(f"  labels {task}:")
        lines += [f"    {k:>3} {v:6d} {'#' * max(1, round(40 * v / total))}" for k, v in hist.items()]
    top_sizes = ", ".join(f"{k} ({v})" for k, v in list(img["sizes"].items())[:5])
    lines += [
        f"  sizes: {top_sizes}",
        f"  modes {img['modes']}; bit depths {img['bit_depths']}; channels {img['channels']}",
        f"  FOV colour mean {img['fov_mean_rgb']} std {img['fov_std_rgb']}",
    ]
    if problems:
        lines.append(f"problems ({len(problems)}):")
        lines += [f"  {p.line()}" for p in sorted(problems, key=lambda p: (not p.fatal, p.kind, p.file))]
    return "\n".join(lines) + "\n"


def _rel(root: Path, path: str) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path
