"""`fedretina synth`'s bookkeeping: a site's data depends only on (seed, site name), finished sites are kept,
a folder it did not write is never deleted, and an unknown profile or site is one line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from shared.data.synth.catalogue import GENERATOR_VERSION, MARKER, synthesize
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
