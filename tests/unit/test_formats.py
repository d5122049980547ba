"""Every format reader reads its real layout (written by the generator) back with the right counts, labels,
patient grouping and masks."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from shared.data.checks import read_site
from shared.data.site_config import load_site_config
from tests.conftest import ROOT


def read(path: Path) -> pd.DataFrame:
    data = read_site(load_site_config(path))
    assert not data.fatal, data.fatal
    return data.manifest


def test_eyepacs(tiny_sites: dict[str, Path]) -> None:
    m = read(tiny_sites["eyepacs"])
    root = load_site_config(tiny_sites["eyepacs"]).root
    train = pd.read_csv(root / "trainLabels.csv")
    test = pd.read_csv(root / "retinopathy_solution.csv")
    assert len(m) == len(train) + len(test) == 20  # 10 patients x 2 eyes
    assert (
        m.groupby("patient_id")["eye"].apply(sorted)
        == pd.Series([["left", "right"]] * 10, dtype=object).values
    ).all()
    assert set(m.loc[m.split == "train", "image_id"]) == set(train.image)
    usage = dict(zip(test.image, test.Usage, strict=True))
    for row in m[m.split != "train"].itertuples():
        assert row.split == {"Public": "val", "Private": "test"}[usage[row.image_id]]
    labels = dict(zip(pd.concat([train, test]).image, pd.concat([train, test]).level, strict=True))
    assert all(int(r.label_dr) == labels[r.image_id] for r in m.itertuples())
    assert all(Path(p).suffix == ".jpeg" and Path(p).is_file() for p in m.path)


def test_messidor2(tiny_sites: dict[str, Path]) -> None:
    m = read(tiny_sites["messidor2"])
    assert len(m) == 12
    suffixes = {Path(p).suffix for p in m.path}
    assert suffixes == {".png", ".JPG"}  # mixed, upper-case JPG matched exactly
    assert (m.groupby("patient_id").size() == 2).all()  # exams pair the two eyes
    ungradable = m[m.gradable == False]  # noqa: E712 - pandas boolean column
    assert ungradable.label_dr.isna().all()
    assert m[m.gradable == True].label_dr.notna().all()  # noqa: E712


def test_aptos(tiny_sites: dict[str, Path]) -> None:
    m = read(tiny_sites["aptos"])
    root = load_site_config(tiny_sites["aptos"]).root
    train = pd.read_csv(root / "train.csv")
    assert len(m) == 15 and (m.split == "train").sum() == len(train) == 12
    assert m[m.split == "test"].label_dr.isna().all()
    assert (m.patient_id == m.image_id).all()
    assert dict(zip(train.id_code, train.diagnosis, strict=True)) == {
        r.image_id: int(r.label_dr) for r in m[m.split == "train"].itertuples()
    }


def test_idrid_grading_and_masks(tiny_sites: dict[str, Path]) -> None:
    m = read(tiny_sites["idrid"])
    grading, seg = m[m.image_id.str.startswith("B-")], m[m.image_id.str.startswith("A-")]
    assert len(grading) == 10 and len(seg) == 6
    assert {"B-train-IDRiD_001", "B-test-IDRiD_001"} <= set(grading.image_id)  # numbering restarts per split
    assert grading.label_dr.notna().all() and grading.label_dme.notna().all()  # "Risk of macular edema " read
    assert seg.label_dr.isna().all()
    assert (seg.mask_od != "").all() and all(Path(p).is_file() for p in seg.mask_od)
    assert (seg.mask_se == "").any() or (
        seg.mask_se != ""
    ).all()  # SE may be missing: allowed, recorded as ""
    present = [p for column in ("mask_ma", "mask_he", "mask_ex", "mask_se") for p in seg[column] if p]
    assert present and all(Path(p).suffix == ".tif" for p in present)


def test_mmac(tiny_sites: dict[str, Path]) -> None:
    m = read(tiny_sites["mmac"])
    assert len(m) == 20 and set(m.split) == {"train", "val"}
    assert m.label_mmac.between(0, 4).all()
    assert all(Path(p).name.startswith("mmac_task_1_") and Path(p).suffix == ".png" for p in m.path)


def test_ukb_patients_eyes_and_outcomes(tiny_sites: dict[str, Path]) -> None:
    m = read(tiny_sites["ukb"])
    root = load_site_config(tiny_sites["ukb"]).root
    outcomes = pd.read_csv(root / "outcomes.csv", dtype=str, keep_default_na=False)
    assert m.patient_id.nunique() == 8
    assert set(m.eye) == {"left", "right"}
    assert all(("21015" in Path(p).name) == (e == "left") for p, e in zip(m.path, m.eye, strict=True))
    for eid, ad_date in zip(outcomes["eid"], outcomes["42020-0.0"], strict=True):
        ad_case = ad_date not in ("", "1900-01-01")  # a placeholder date means "missing"
        assert (m[m.patient_id == eid].label_ad == int(ad_case)).all()


def test_folder_classes(tiny_sites: dict[str, Path]) -> None:
    data = read_site(load_site_config(tiny_sites["folder"]))
    m = data.manifest
    assert len(m) == 12 and data.tasks == {"label": 2}
    assert all(("1_referable" in p) == (lab == 1) for p, lab in zip(m.path, m.label_label, strict=True))


def test_folder_csv_without_class_numbers_is_one_fatal_problem(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("path,label\na.png,cataract\nb.png,normal\n")
    site = tmp_path / "site.yaml"
    site.write_text(f"name: other\nformat: folder\nroot: {tmp_path}\noptions: {{csv: labels.csv}}\n")
    data = read_site(load_site_config(site))
    assert [(p.kind, p.file) for p in data.fatal] == [("labels", "labels.csv")]
    assert "class numbers" in data.fatal[0].reason


@pytest.mark.parametrize("fmt", ["eyepacs", "mmac", "aptos"])
def test_unnamed_files_are_reported_not_used(tiny_sites: dict[str, Path], fmt: str, tmp_path: Path) -> None:
    import shutil

    import yaml

    spec = yaml.safe_load(tiny_sites[fmt].read_text())
    copy = tmp_path / fmt
    shutil.copytree(spec["root"], copy)
    first = read(tiny_sites[fmt]).path.iloc[0]
    extra = copy / Path(first).relative_to(spec["root"]).parent / ("stray" + Path(first).suffix)
    shutil.copy(first, extra)
    spec["root"] = str(copy)
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(spec))
    data = read_site(load_site_config(path))
    notes = [p for p in data.problems if p.kind == "unnamed-file"]
    assert len(notes) == 1 and notes[0].file.endswith("stray" + Path(first).suffix) and not notes[0].excluded
    assert not data.manifest.path.str.contains("stray").any()


@pytest.mark.parametrize("path", sorted((ROOT / "sites" / "templates").glob("*.yaml")), ids=lambda p: p.stem)
def test_site_templates_validate(path: Path) -> None:
    from shared.config import read_yaml, validate
    from shared.data.formats import FORMATS
    from shared.data.site_config import SiteConfig

    site = validate(SiteConfig, read_yaml(path), str(path))
    FORMATS[site.format].options.model_validate(site.options)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "simulation" / "scenarios").glob("*.yaml")), ids=lambda p: p.stem
)
def test_scenarios_validate(path: Path) -> None:
    from shared.data.scenario import load_scenario

    scenario = load_scenario(str(path))
    assert scenario.name == path.stem and scenario.size >= 1
    entries = scenario.sites or (scenario.split.source,)  # type: ignore[union-attr]
    assert all(Path(e).parent == ROOT / "sites" / "generated" for e in entries)  # beside the scenario file
