"""IDRiD (Indian Diabetic Retinopathy Image Dataset).

Part B (grading): `B. Disease Grading/1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_NNN.jpg` with
`2. Groundtruths/{a. IDRiD_Disease Grading_Training Labels.csv,b. ..._Testing Labels.csv}`: `Image name` (no
extension), `Retinopathy grade`, `Risk of macular edema ` (header with a trailing space; blank trailing
columns and rows). Numbering restarts in each split, so image ids carry part and split.

Part A (segmentation): `A. Segmentation/1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_NN.jpg` and
masks `2. All Segmentation Groundtruths/<split>/<k. Lesion>/IDRiD_NN_{MA,HE,EX,SE,OD}.tif`. A missing mask
means "no lesion of that type annotated" (SE exists for about half the images): its column stays "".
"""

from __future__ import annotations

from pathlib import Path

from shared.config import Strict
from shared.data.formats.common import (
    FormatReader,
    Rows,
    add_row,
    drop_conflicts,
    parse_label,
    read_csv,
    unnamed_images,
)
from shared.data.labels import label_column

SPLITS = (("train", "a. Training Set"), ("test", "b. Testing Set"))
MASK_DIRS = {
    "ma": "1. Microaneurysms",
    "he": "2. Haemorrhages",
    "ex": "3. Hard Exudates",
    "se": "4. Soft Exudates",
    "od": "5. Optic Disc",
}
GRADING_CSV = {
    "train": "a. IDRiD_Disease Grading_Training Labels.csv",
    "test": "b. IDRiD_Disease Grading_Testing Labels.csv",
}


class Options(Strict):
    grading_dir: str | None = "B. Disease Grading"
    segmentation_dir: str | None = "A. Segmentation"


def read(root: Path, opt: Options) -> Rows:
    out = Rows(root)
    if opt.grading_dir and (root / opt.grading_dir).is_dir():
        _grading(out, root / opt.grading_dir)
    if opt.segmentation_dir and (root / opt.segmentation_dir).is_dir():
        _segmentation(out, root / opt.segmentation_dir)
    if not out.rows and not out.problems:
        out.problem(
            "empty", root, f"neither {opt.grading_dir!r} nor {opt.segmentation_dir!r} found", fatal=True
        )
    drop_conflicts(out)
    return out


def _grading(out: Rows, base: Path) -> None:
    for split, folder in SPLITS:
        csv = base / "2. Groundtruths" / GRADING_CSV[split]
        df = read_csv(out, csv, ("Image name", "Retinopathy grade", "Risk of macular edema"))
        if df is None:
            continue
        images = base / "1. Original Images" / folder
        named: set[Path] = set()
        for rec in df.to_dict("records"):
            path = images / f"{rec['Image name']}.jpg"
            named.add(path)
            image_id = f"B-{split}-{rec['Image name']}"
            row = {"image_id": image_id, "patient_id": image_id, "split": split}

            def labels(r: dict = rec, p: Path = path) -> dict:
                return {
                    label_column("dr"): parse_label(out, r["Retinopathy grade"], "dr", p),
                    label_column("dme"): parse_label(out, r["Risk of macular edema"], "dme", p),
                }

            add_row(out, path, row, labels)
        unnamed_images(out, images, named, csv.name)


def _segmentation(out: Rows, base: Path) -> None:
    for split, folder in SPLITS:
        images = base / "1. Original Images" / folder
        masks = base / "2. All Segmentation Groundtruths" / folder
        for path in sorted(images.glob("IDRiD_*.jpg")):
            image_id = f"A-{split}-{path.stem}"
            row = {"image_id": image_id, "patient_id": image_id, "split": split}
            for lesion, sub in MASK_DIRS.items():
                mask = masks / sub / f"{path.stem}_{lesion.upper()}.tif"
                row[f"mask_{lesion}"] = str(mask) if mask.is_file() else ""
            add_row(out, path, row, dict)


READER = FormatReader("idrid", Options, read, "IDRiD: DR/DME grading (part B) and lesion masks (part A)")
