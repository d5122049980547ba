"""`fedretina site check` on deliberately broken sites: every problem against its file, fatal ones exit
non-zero with one line each, conversions noted, nothing written outside the report folder."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from tests.conftest import FEDRETINA


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def copy_site(yaml_path: Path, dest: Path) -> tuple[Path, Path]:
    spec = yaml.safe_load(yaml_path.read_text())
    data = dest / "data"
    shutil.copytree(spec["root"], data)
    spec |= {"root": str(data), "state_dir": str(dest / "state")}
    site = dest / "site.yaml"
    site.write_text(yaml.safe_dump(spec))
    return site, data


def check(site: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FEDRETINA, "site", "check", str(site), "--out", str(out), "--workers", "1"],
        capture_output=True,
        text=True,
        check=False,
    )


def test_broken_eyepacs_site_reports_each_problem_against_its_file(
    tiny_sites: dict[str, Path], tmp_path: Path
) -> None:
    site, data = copy_site(tiny_sites["eyepacs"], tmp_path)
    labels = pd.read_csv(data / "trainLabels.csv")
    names = list(labels.image)
    corrupt, empty, missing, seven, twice = names[:5]
    raw = (data / "train" / f"{corrupt}.jpeg").read_bytes()
    (data / "train" / f"{corrupt}.jpeg").write_bytes(raw[: len(raw) // 3])  # truncated JPEG
    (data / "train" / f"{empty}.jpeg").write_bytes(b"")  # zero bytes
    (data / "train" / f"{missing}.jpeg").unlink()  # named in the CSV, gone from disk
    labels.loc[labels.image == seven, "level"] = 7  # outside 0-4
    labels = pd.concat(
        [labels, pd.DataFrame([{"image": twice, "level": (labels.set_index("image").level[twice] + 2) % 5}])]
    )
    labels.to_csv(data / "trainLabels.csv", index=False)  # one eye graded twice, differently
    solution = pd.read_csv(data / "retinopathy_solution.csv").rename(columns={"Usage": "Usgae"})
    solution.to_csv(data / "retinopathy_solution.csv", index=False)  # misspelt column: fatal
    before = snapshot(tmp_path)
    out = tmp_path / "report"

    result = check(site, out)

    assert result.returncode == 3
    errors = result.stderr.strip().splitlines()
    assert (
        errors
        == [
            "fedretina: error: eyepacs: retinopathy_solution.csv: required column 'Usage' is missing "
            "(found 'Usgae': misspelt header?)",
            errors[1],
        ]
        and "excluded" in errors[1]
    )  # fatal: the CSV, and too many exclusions
    report = json.loads((out / "report.json").read_text())
    by_file = {Path(p["file"]).name: p for p in report["problems"]}
    assert by_file[f"{corrupt}.jpeg"]["kind"] == "truncated"
    assert by_file[f"{empty}.jpeg"]["kind"] == "zero-byte" and "0 bytes" in by_file[f"{empty}.jpeg"]["reason"]
    assert by_file[f"{missing}.jpeg"]["kind"] == "missing-file"
    assert (
        by_file[f"{seven}.jpeg"]["kind"] == "bad-label"
        and "'7' is outside" in by_file[f"{seven}.jpeg"]["reason"]
    )
    assert by_file[f"{twice}.jpeg"]["kind"] == "conflicting-labels"
    assert report["verdict"] == "unusable"
    usable = pd.read_csv(out / "manifest.csv")
    assert not {corrupt, empty, missing, seven, twice} & set(usable.image_id)
    summary = (out / "summary.txt").read_text()
    assert all(name in summary for name in (corrupt, empty, missing, seven, twice))
    after = snapshot(tmp_path)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed and all(k.startswith("report/") for k in changed), changed


def test_odd_image_modes_are_converted_or_refused_with_a_reason(tmp_path: Path) -> None:
    data = tmp_path / "data" / "0_class"
    data.mkdir(parents=True)
    ring = np.zeros((64, 64), dtype=np.float64)
    yy, xx = np.mgrid[:64, :64]
    ring[(yy - 32) ** 2 + (xx - 32) ** 2 < 28**2] = 1.0
    rgb = (np.stack([ring * 200, ring * 80, ring * 40], -1)).astype(np.uint8)
    Image.fromarray((ring * 40000).astype(np.uint16)).save(data / "grey16.png")  # I;16
    Image.fromarray(rgb).convert("RGBA").save(data / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(data / "cmyk.jpg")
    Image.fromarray(rgb).convert("1").save(data / "bilevel.png")
    Image.fromarray(rgb).save(data / "plain.png")
    shutil.copy(data / "plain.png", data / "plain_copy.png")  # duplicate content
    site = tmp_path / "site.yaml"
    site.write_text(
        yaml.safe_dump(
            {
                "name": "odd",
                "format": "folder",
                "root": str(tmp_path / "data"),
                "state_dir": str(tmp_path / "state"),
                "max_excluded_fraction": 0.5,
            }
        )
    )
    result = check(site, tmp_path / "report")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    by_file = {Path(p["file"]).name: p for p in report["problems"]}
    assert (
        "16-bit greyscale scaled to 8-bit" in by_file["grey16.png"]["reason"]
        and not by_file["grey16.png"]["excluded"]
    )
    assert "alpha composited on black" in by_file["rgba.png"]["reason"]
    assert "CMYK converted to RGB" in by_file["cmyk.jpg"]["reason"]
    assert by_file["bilevel.png"]["kind"] == "unsupported-mode" and by_file["bilevel.png"]["excluded"]
    assert by_file["plain_copy.png"]["kind"] == "duplicate"
    assert report["images"]["bit_depths"] == {"8": 4, "16": 1}
    assert report["counts"]["usable"] == 4


def test_a_clean_site_passes_and_training_reads_its_checked_manifest(
    tiny_sites: dict[str, Path], tmp_path: Path
) -> None:
    from shared.data.checks import load_checked_manifest
    from shared.data.site_config import load_site_config

    site, _ = copy_site(tiny_sites["mmac"], tmp_path)
    result = subprocess.run(
        [FEDRETINA, "site", "check", str(site), "--workers", "1"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "USABLE" in result.stdout
    manifest = load_checked_manifest(load_site_config(site))
    assert len(manifest) == 20 and str(manifest.label_mmac.dtype) == "Int64"
    # Training reads the checked manifest itself, not a fresh listing: drop two rows and it sees 18.
    checked = site.parent / "state" / "check" / "manifest.csv"
    checked.write_text("".join(checked.read_text().splitlines(keepends=True)[:-2]))
    assert len(load_checked_manifest(load_site_config(site))) == 18
