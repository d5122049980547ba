"""The bad inputs the hostile-user review found ending in a traceback or worse, each given to the command
a person would run: one `fedretina: error:` line, a non-zero exit, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from shared.config import load_config
from shared.data.checks import check_site
from shared.data.site_config import load_site_config
from shared.models import build_encoder
from shared.weights import save_weights, weights_meta
from tests.conftest import write_site
from tests.security.cli import fedretina, one_error

pytestmark = pytest.mark.security


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_site(tmp_path, "eyepacs", 6)


def test_weights_whose_metadata_is_not_json(site: Path, tmp_path: Path, capsys) -> None:
    weights = tmp_path / "odd.safetensors"
    save_file({"w": torch.zeros(2)}, str(weights), metadata={"fedretina": "{not json"})
    args = ["analyze", "spectra", "--profile", "tiny", "--site", str(site), "--model", f"A={weights}"]
    code, err = fedretina([*args, "--set", f"runs_dir={tmp_path / 'runs'}"], capsys)
    assert code == 4 and "metadata is not a JSON record" in one_error(err)
    assert not (tmp_path / "runs").exists()


def test_an_empty_labels_csv(site: Path, capsys) -> None:
    labels = load_site_config(site).root / "trainLabels.csv"
    labels.write_bytes(b"")
    code, err = fedretina(["site", "check", str(site)], capsys)
    assert code == 3 and "trainLabels.csv: labels CSV is empty (0 bytes or no header row)" in one_error(err)


def test_a_labels_row_naming_a_file_outside_the_dataset(site: Path, tmp_path: Path, capsys) -> None:
    """A CSV-listed (folder format) dataset whose CSV names `../x.jpeg` and `/etc/passwd`: both rows are
    refused and reported, never read into the manifest."""
    images = sorted((load_site_config(site).root / "train").glob("*.jpeg"))
    root = tmp_path / "listed"
    (root / "images").mkdir(parents=True)
    rows = ["path,label"]
    for i, image in enumerate(images):
        (root / "images" / image.name).write_bytes(image.read_bytes())
        rows.append(f"images/{image.name},{i % 2}")
    (tmp_path / "x.jpeg").write_bytes(images[0].read_bytes())  # a real image, beside the dataset
    rows += ["../x.jpeg,1", "/etc/passwd,0"]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    yaml_path = tmp_path / "listed.yaml"
    options = {"csv": "labels.csv", "task": "ad"}
    yaml_path.write_text(
        yaml.safe_dump(
            {
                "name": "listed",
                "format": "folder",
                "root": str(root),
                "state_dir": str(tmp_path / "s"),
                "options": options,
                "max_excluded_fraction": 0.5,
            }
        )
    )
    code, _ = fedretina(["site", "check", str(yaml_path)], capsys)
    report = json.loads((tmp_path / "s" / "check" / "report.json").read_text())
    problems = sorted(p["file"] for p in report["problems"] if p["kind"] == "outside-root")
    assert code == 0 and len(problems) == 2 and any("passwd" in p for p in problems), report["problems"]
    manifest = (tmp_path / "s" / "check" / "manifest.csv").read_text()
    assert "passwd" not in manifest and "x.jpeg" not in manifest
    assert len(manifest.splitlines()) == len(images) + 1  # the header and the dataset's own images


def test_a_corrupt_run_store_under_server_summary(tmp_path: Path, capsys) -> None:
    store = tmp_path / "run" / "federation" / "store.sqlite"
    store.parent.mkdir(parents=True)
    store.write_bytes(b"SQLite format 3\x00" + b"\x13" * 4000)
    code, err = fedretina(["server", "summary", str(tmp_path / "run")], capsys)
    assert code == 1 and "not a readable run store" in one_error(err)
    assert sorted(p.name for p in store.parent.iterdir()) == ["store.sqlite"]  # nothing written beside it


def test_compare_before_synth(tmp_path: Path, capsys) -> None:
    scenario = tmp_path / "two.yaml"
    scenario.write_text(yaml.safe_dump({"name": "two", "sites": ["sites/generated/eyepacs.yaml", "b.yaml"]}))
    experiment = tmp_path / "compare.yaml"
    experiment.write_text(yaml.safe_dump({"profile": "tiny", "compare": {"scenarios": {str(scenario): []}}}))
    code, err = fedretina(
        ["compare", "-c", str(experiment), "--set", f"runs_dir={tmp_path / 'runs'}"], capsys
    )
    assert code == 2 and "eyepacs.yaml not found (render the synthetic sites first" in one_error(err)


def test_a_port_out_of_range(tmp_path: Path, capsys) -> None:
    code, err = fedretina(["dashboard", str(tmp_path), "--port", "99999"], capsys)
    assert code == 2 and "'--port': 99999 is not in the range 1<=x<=65535" in one_error(err)


def test_init_weights_of_another_shape_before_any_training(site: Path, tmp_path: Path, capsys) -> None:
    """The file's record says the right architecture, its tensors do not fit: refused before any arm
    trains and before the run folder exists."""
    check_site(load_site_config(site), workers=1)
    cfg = load_config(profile="tiny")
    tensors = dict(build_encoder(cfg.model).state_dict())
    first = next(k for k, v in tensors.items() if v.ndim == 4)
    tensors[first] = torch.zeros(1, 1, 1, 1)
    weights = tmp_path / "spark.safetensors"
    save_weights(weights, tensors, weights_meta(cfg, "spark-encoder"))
    experiment = tmp_path / "ft.yaml"
    inits = {"scratch": {"kind": "scratch"}, "spark": {"kind": "spark", "weights": str(weights)}}
    experiment.write_text(
        yaml.safe_dump({"profile": "tiny", "sites": [str(site)], "finetune": {"inits": inits}})
    )
    runs = tmp_path / "runs"
    code, err = fedretina(["finetune", "-c", str(experiment), "--set", f"runs_dir={runs}"], capsys)
    assert code == 4 and "tensors have other shapes than the model's" in one_error(err)
    assert not runs.exists()


def test_a_state_folder_inside_the_dataset_is_refused(site: Path, capsys) -> None:
    """A site never writes in its dataset: a state_dir inside it (or the dataset inside the state folder)
    is refused before anything is written, and so is a report folder inside it."""
    root = load_site_config(site).root
    before = sorted(root.rglob("*"))
    for state in (root / "state", root, root.parent):
        site.write_text(yaml.safe_dump(yaml.safe_load(site.read_text()) | {"state_dir": str(state)}))
        code, err = fedretina(["site", "check", str(site)], capsys)
        assert code == 2 and "overlap; a site never writes in its dataset" in one_error(err), state
    site.write_text(yaml.safe_dump(yaml.safe_load(site.read_text()) | {"state_dir": str(root.parent / "s")}))
    code, err = fedretina(["site", "check", str(site), "--out", str(root / "report")], capsys)
    assert code == 2 and "is inside the dataset" in one_error(err)
    assert sorted(root.rglob("*")) == before
