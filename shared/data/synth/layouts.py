"""Write synthetic datasets in the real datasets' on-disk layouts (see `shared/data/formats/`), so every
reader, the site check and the training pipeline run on this machine exactly as on the real data.

Each `write_<format>` lays out its CSVs and returns the render jobs; `render_jobs` draws and encodes the
images in parallel. Everything is deterministic given the seed.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from shared.data.formats import idrid, mmac
from shared.data.synth.population import (
    DR_WEIGHTS,
    SCREENING_DR_WEIGHTS,
    VOLUNTEER_DR_WEIGHTS,
    Person,
    people,
)
from shared.data.synth.render import CAMERA_STYLES, FundusSpec, render_fundus
from shared.logs import progress
from shared.seeding import derive_seed

MASK_KEYS = {"ma": "MA", "he": "HE", "ex": "EX", "se": "SE", "od": "OD"}


@dataclass(frozen=True)
class Job:
    spec: FundusSpec
    style: str
    height: int
    path: Path
    masks: dict[str, Path] = field(default_factory=dict)  # renderer mask key -> .tif path


def render_jobs(jobs: list[Job], workers: int = 2, desc: str = "rendering") -> None:
    """Render, encode (JPEG quality from the camera style) and write every job's image and masks."""
    for job in jobs:
        job.path.parent.mkdir(parents=True, exist_ok=True)
        for mask in job.masks.values():
            mask.parent.mkdir(parents=True, exist_ok=True)
    if workers > 1 and len(jobs) > 4:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(
                progress(pool.map(_render_one, jobs, chunksize=8), desc, len(jobs), "img")
            )  # drain: results are None
    else:
        for job in progress(jobs, desc, len(jobs), "img"):
            _render_one(job)


def _render_one(job: Job) -> None:
    out = render_fundus(job.spec, CAMERA_STYLES[job.style], job.height)
    image = Image.fromarray(out.image)
    if job.path.suffix.lower() in (".jpeg", ".jpg"):
        image.save(job.path, quality=CAMERA_STYLES[job.style].jpeg_quality)
    else:
        image.save(job.path)
    for key, path in job.masks.items():
        if out.masks[key].any() or key == "od":
            Image.fromarray(out.masks[key].astype(np.uint8) * 255).save(path, compression="tiff_lzw")


def _style(styles: tuple[str, ...], seed: int, key: object) -> str:
    return styles[derive_seed(seed, "style", key) % len(styles)]


def _csv(path: Path, rows: list[dict] | pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)


def write_eyepacs(
    root: Path,
    patients: int,
    seed: int,
    height: int,
    styles: tuple[str, ...],
    test_fraction: float = 0.25,
    unlabelled: int = 0,
    first_id: int = 10,
) -> list[Job]:
    """`train/<patient>_<eye>.jpeg` + trainLabels.csv; `test/` + retinopathy_solution.csv (Public/Private).

    `unlabelled`: a screening pool instead, every image in `test/` without any CSV, with EyePACS's own
    grade proportions. `test_fraction` 1: a test set only (no train folder or CSV); `first_id`: the first
    patient number, so two sites' patients never share an image name."""
    if unlabelled:
        pool = people(patients, seed, dr=SCREENING_DR_WEIGHTS, first_id=10)
        return [
            Job(p.spec(eye), _style(styles, seed, p.pid), height, root / "test" / f"{p.pid}_{eye}.jpeg")
            for p in pool
            for eye in ("left", "right")
        ]
    jobs, train, test = [], [], []
    n_test = round(patients * test_fraction)
    for k, person in enumerate(people(patients, seed, dr=DR_WEIGHTS, first_id=int(first_id))):
        folder = "test" if k >= patients - n_test else "train"
        style = _style(styles, seed, person.pid)
        for eye, grade in zip(("left", "right"), person.dr, strict=True):
            name = f"{person.pid}_{eye}"
            jobs.append(Job(person.spec(eye), style, height, root / folder / f"{name}.jpeg"))
            if folder == "train":
                train.append({"image": name, "level": grade})
            else:
                usage = "Public" if derive_seed(seed, "usage", person.pid) % 5 == 0 else "Private"
                test.append({"image": name, "level": grade, "Usage": usage})
    if train:
        _csv(root / "trainLabels.csv", train)
    if test:
        _csv(root / "retinopathy_solution.csv", test)
    return jobs


def write_mmac(
    root: Path, images: int, seed: int, height: int, styles: tuple[str, ...], val_fraction: float = 0.2
) -> list[Job]:
    """MMAC task-1 folders with spaces in their names; `image` column WITH .png; metadata columns."""
    base = root / mmac.TASK_DIR
    opt = mmac.Options()
    rng = np.random.default_rng(derive_seed(seed, "mmac-meta"))
    jobs, rows = [], {"train": [], "val": []}
    n_val = round(images * val_fraction)
    for k, person in enumerate(people(images, seed, mm=True)):  # one image per (unnamed) subject
        split = "val" if k >= images - n_val else "train"
        number = k + 1 if split == "train" else k - (images - n_val) + 1
        name = f"mmac_task_1_{split}_{number:04d}.png"
        eye = ("left", "right")[derive_seed(seed, "eye", k) % 2]
        folder = opt.train_images if split == "train" else opt.val_images
        jobs.append(Job(person.spec(eye), _style(styles, seed, k), height, base / folder / name))
        rows[split].append(
            {
                "image": name,
                "myopic_maculopathy_grade": person.mm[0 if eye == "left" else 1],
                "age": int(rng.integers(20, 80)),
                "sex": int(rng.integers(0, 2)),
                "height": round(float(rng.normal(165, 8)), 1),
                "weight": round(float(rng.normal(62, 10)), 1),
                "data_center": int(rng.integers(1, 4)),
            }
        )
    _csv(base / opt.train_labels, rows["train"])
    if rows["val"]:
        _csv(base / opt.val_labels, rows["val"])
    return jobs


def write_ukb(
    root: Path,
    participants: int,
    seed: int,
    height: int,
    styles: tuple[str, ...],
    first_eid: int = 1000001,
    outcomes: bool = True,
    repeat_fraction: float = 0.2,
) -> list[Job]:
    """`<eid>_<21015|21016>_<instance>_0.png` in 2-digit bucket folders; an outcomes extract with AD and PD
    dates (cases only; placeholder dates sprinkled in, which must count as missing). Volunteers carry DR at
    UK Biobank's low prevalence, unlabelled."""
    jobs, extract = [], []
    for person in people(participants, seed, dr=VOLUNTEER_DR_WEIGHTS, neuro=True, first_id=first_eid):
        visits = 2 if derive_seed(seed, "repeat", person.pid) % 100 < repeat_fraction * 100 else 1
        style = _style(styles, seed, person.pid)
        for instance in range(visits):
            for eye, field_id in (("left", "21015"), ("right", "21016")):
                path = root / person.pid[-2:] / f"{person.pid}_{field_id}_{instance}_0.png"
                jobs.append(Job(person.spec(eye, instance), style, height, path))
        extract.append(_outcome_row(person, seed))
    if outcomes:
        _csv(root / "outcomes.csv", extract)
    return jobs


def _outcome_row(person: Person, seed: int) -> dict[str, str]:
    """A case gets a real date in 42020 (AD) or 42032 (PD); some controls carry a placeholder date."""
    h = derive_seed(seed, "outcome", person.pid)
    row = {"eid": person.pid, "42020-0.0": "", "42032-0.0": "", "53-0.0": "2010-06-01"}
    if person.neuro:
        row["42020-0.0" if h % 2 == 0 else "42032-0.0"] = f"20{14 + h % 8}-0{1 + h % 9}-15"
    elif h % 10 == 0:
        row["42020-0.0"] = "1900-01-01"
    return row


def write_idrid(
    root: Path, seg_images: int, seed: int, height: int, styles: tuple[str, ...], grading_images: int = 60
) -> list[Job]:
    """IDRiD parts A (images + per-lesion .tif masks, missing where a lesion is absent) and B (grading CSVs
    with the trailing-space header and blank trailing columns; numbering restarts per split)."""
    jobs = []
    seg = root / "A. Segmentation"
    n_train = round(seg_images * 2 / 3)
    for k, person in enumerate(people(seg_images, seed + 1, dr=DR_WEIGHTS)):
        split_dir = idrid.SPLITS[0][1] if k < n_train else idrid.SPLITS[1][1]
        name = f"IDRiD_{k + 1:02d}"
        spec = person.spec("right")
        spec = replace(spec, dr_grade=max(spec.dr_grade, 2))  # every segmentation image has lesions to mask
        masks = {
            key: seg
            / "2. All Segmentation Groundtruths"
            / split_dir
            / idrid.MASK_DIRS[key]
            / f"{name}_{suffix}.tif"
            for key, suffix in MASK_KEYS.items()
        }
        jobs.append(
            Job(
                spec,
                _style(styles, seed, name),
                height,
                seg / "1. Original Images" / split_dir / f"{name}.jpg",
                masks,
            )
        )
    grading = root / "B. Disease Grading"
    n_train = round(grading_images * 0.8)
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    for k, person in enumerate(people(grading_images, seed + 2, dr=DR_WEIGHTS)):
        split = "train" if k < n_train else "test"
        number = k + 1 if split == "train" else k - n_train + 1
        name = f"IDRiD_{number:03d}"
        split_dir = dict(idrid.SPLITS)[split]
        jobs.append(
            Job(
                person.spec("left"),
                _style(styles, seed, f"B{k}"),
                height,
                grading / "1. Original Images" / split_dir / f"{name}.jpg",
            )
        )
        dme = min(2, person.dr[0] // 2)
        rows[split].append(
            {
                "Image name": name,
                "Retinopathy grade": person.dr[0],
                "Risk of macular edema ": dme,
                "": "",
                " ": "",
            }
        )
    for split, csv_name in idrid.GRADING_CSV.items():
        _csv(grading / "2. Groundtruths" / csv_name, rows[split])
    return jobs


def write_messidor2(root: Path, exams: int, seed: int, height: int, styles: tuple[str, ...]) -> list[Job]:
    """`IMAGES/` with mixed `*_PP.png` and upper-case `IM*.JPG`, messidor_data.csv (ungradable = empty grade)
    and the `;`-separated exam pairing file."""
    jobs, rows, pairs = [], [], []
    for k, person in enumerate(people(exams, seed, dr=DR_WEIGHTS)):
        names = []
        for eye in ("left", "right"):
            if k % 3 == 2:
                name = f"IM{4000 + 2 * k + (eye == 'right'):06d}.JPG"
            else:
                name = f"2005{1000 + k:04d}_{43000 + 2 * k + (eye == 'right')}_0100_PP.png"
            names.append(name)
            grade = person.dr[0 if eye == "left" else 1]
            ungradable = derive_seed(seed, "gradable", name) % 25 == 0
            jobs.append(Job(person.spec(eye), _style(styles, seed, k), height, root / "IMAGES" / name))
            rows.append(
                {
                    "image_id": name,
                    "adjudicated_dr_grade": "" if ungradable else grade,
                    "adjudicated_dme": "" if ungradable else int(grade >= 3),
                    "adjudicated_gradable": 0 if ungradable else 1,
                }
            )
        pairs.append(";".join(names))
    _csv(root / "messidor_data.csv", rows)
    (root / "messidor-2.csv").write_text("\n".join(pairs) + "\n")
    return jobs


def write_aptos(
    root: Path, images: int, seed: int, height: int, styles: tuple[str, ...], test_fraction: float = 0.2
) -> list[Job]:
    """train.csv (id_code,diagnosis) + train_images/<id_code>.png; test.csv + test_images/ without labels."""
    jobs, rows = [], {"train": [], "test": []}
    n_test = round(images * test_fraction)
    for k, person in enumerate(people(images, seed, dr=DR_WEIGHTS)):
        split = "test" if k >= images - n_test else "train"
        code = f"{derive_seed(seed, 'aptos', k) % 16**12:012x}"
        jobs.append(
            Job(
                person.spec("left"), _style(styles, seed, k), height, root / f"{split}_images" / f"{code}.png"
            )
        )
        rows[split].append(
            {"id_code": code, "diagnosis": person.dr[0]} if split == "train" else {"id_code": code}
        )
    _csv(root / "train.csv", rows["train"])
    _csv(root / "test.csv", rows["test"])
    return jobs


def write_folder(root: Path, images: int, seed: int, height: int, styles: tuple[str, ...]) -> list[Job]:
    """One folder per class (`0_normal/`, `1_referable/`): referable DR as a generic 2-class task."""
    jobs = []
    for k, person in enumerate(people(images, seed, dr=DR_WEIGHTS)):
        label = int(person.dr[0] >= 2)
        folder = ("0_normal", "1_referable")[label]
        jobs.append(
            Job(person.spec("left"), _style(styles, seed, k), height, root / folder / f"img{k:04d}.png")
        )
    return jobs


WRITERS: dict[str, Callable[..., list[Job]]] = {
    "eyepacs": write_eyepacs,
    "mmac": write_mmac,
    "ukb": write_ukb,
    "idrid": write_idrid,
    "messidor2": write_messidor2,
    "aptos": write_aptos,
    "folder": write_folder,
}
