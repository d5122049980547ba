"""`fedretina synth`'s bookkeeping: a site's data depends only on (seed, site name), finished sites are kept,
a folder it did not write is never deleted, an unknown profile or site is one line, and the held-out test
site is written only when asked for."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from shared.data.site import load_site
from shared.data.synth.catalogue import GENERATOR_VERSION, MARKER, PLANS, selected_plans, synthesize
from shared.errors import ConfigError, DataError
from tests.conftest import FEDRETINA
from tests.unit.test_site_check import snapshot


def test_a_site_is_the_same_whichever_sites_are_written_with_it(tmp_path: Path) -> None:
    synthesize("tiny", tmp_path / "one" / "data", tmp_path / "one" / "sites", workers=1, only=("ukb-a",))
    synthesize(
        "tiny", tmp_path / "two" / "data", tmp_path / "two" / "sites", workers=1, only=("ukb-b", "ukb-a")
    )
    first = snapshot(tmp_path / "one" / "data" / "ukb-a")
    assert first == snapshot(tmp_path / "two" / "data" / "ukb-a")
    assert first != snapshot(tmp_path / "two" / "data" / "ukb-b")
    stamp = json.loads((tmp_path / "one" / "data" / "ukb-a" / MARKER).read_text())
    assert stamp["version"] == GENERATOR_VERSION and stamp["seed"] == 0


def test_a_finished_site_is_kept_and_a_changed_seed_rewrites_it(tmp_path: Path) -> None:
    data, sites = tmp_path / "data", tmp_path / "sites"
    synthesize("tiny", data, sites, workers=1, only=("ukb-a",))
    image = next((data / "ukb-a").rglob("*.png"))
    before, mtime = snapshot(data / "ukb-a"), image.stat().st_mtime_ns
    synthesize("tiny", data, sites, workers=1, only=("ukb-a",))
    assert image.stat().st_mtime_ns == mtime
    synthesize("tiny", data, sites, seed=1, workers=1, only=("ukb-a",))
    assert snapshot(data / "ukb-a") != before


def test_a_folder_not_written_by_synth_is_refused_and_left_alone(tmp_path: Path) -> None:
    precious = tmp_path / "data" / "ukb-a" / "21015_2_0.png"
    precious.parent.mkdir(parents=True)
    precious.write_bytes(b"a real participant's photograph")
    with pytest.raises(DataError, match=r"ukb-a: not empty and not written by `fedretina synth`"):
        synthesize("tiny", tmp_path / "data", tmp_path / "sites", workers=1, only=("ukb-a",))
    assert precious.read_bytes() == b"a real participant's photograph"


def test_an_unknown_profile_or_site_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [FEDRETINA, "synth", "--profile", "bogus", "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == ConfigError.exit_code
    assert (
        result.stderr.strip()
        == "fedretina: error: --profile: unknown profile 'bogus'; choose one of tiny, cpu, paper"
    )
    with pytest.raises(ConfigError, match=r"--only: no site \['nope'\] in the tiny plan"):
        synthesize("tiny", tmp_path / "d", tmp_path / "s", only=("nope",))
    assert not (tmp_path / "d").exists()


def test_the_held_out_test_site_is_written_only_on_request_and_holds_only_new_held_out_patients(
    tmp_path: Path,
) -> None:
    """`eyepacs-test` (compare.test_sites): absent from a full run, written by `--only`; every image is a
    validation or test image of a patient numbered apart from the EyePACS-like site's own."""
    data, sites = tmp_path / "data", tmp_path / "sites"
    written = synthesize("tiny", data, sites, workers=1, only=("eyepacs", "eyepacs-test"))
    listed = [p.stem for p in written]
    assert listed == ["eyepacs", "eyepacs-test"]
    site = load_site(sites / "eyepacs-test.yaml")
    own = load_site(sites / "eyepacs.yaml")
    assert set(site.rows["split"]) == {"val", "test"} and not (data / "eyepacs-test" / "train").exists()
    assert len(site.rows) == 2 * 31 and site.rows["label_dr"].notna().all()
    assert not set(site.rows["patient_id"]) & set(own.rows["patient_id"])
    assert all(int(p) >= 100_000 for p in site.rows["patient_id"])
    full = [p.name for p in selected_plans("cpu")]
    assert "eyepacs-test" not in full and "eyepacs" in full and len(full) == len(PLANS["cpu"]) - 1
