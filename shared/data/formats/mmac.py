"""MMAC 2023 task 1 (myopic maculopathy): images under
`1. Classification of Myopic Maculopathy/1. Images/{1. Training Set,2. Validation Set}/` and labels in
`2. Groundtruths/*Training_Labels.csv` / `*Validation_Labels.csv` with columns
`image` (file name WITH .png), `myopic_maculopathy_grade`, age, sex, height, weight, data_center.
No patient ids are released: each image is its own subject.
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

TASK_DIR = "1. Classification of Myopic Maculopathy"
LABELS = "2. Groundtruths/{n}. MMAC2023_Myopic_Maculopathy_Classification_{split}_Labels.csv"


class Options(Strict):
    task_dir: str = TASK_DIR
    train_images: str = "1. Images/1. Training Set"
    val_images: str = "1. Images/2. Validation Set"
    train_labels: str = LABELS.format(n=1, split="Training")
    val_labels: str = LABELS.format(n=2, split="Validation")


def read(root: Path, opt: Options) -> Rows:
    out = Rows(root)
    base = root / opt.task_dir
    for split, folder, csv_name in (
        ("train", opt.train_images, opt.train_labels),
        ("val", opt.val_images, opt.val_labels),
    ):
        if split == "val" and not (base / csv_name).exists():
            continue  # the validation release is optional
        df = read_csv(out, base / csv_name, ("image", "myopic_maculopathy_grade"))
        if df is None:
            continue
        named: set[Path] = set()
        for rec in df.itertuples(index=False):
            path = base / folder / rec.image
            named.add(path)
            stem = Path(rec.image).stem
            row = {"image_id": stem, "patient_id": stem, "split": split}
            grade = rec.myopic_maculopathy_grade
            add_row(
                out, path, row, lambda g=grade, p=path: {label_column("mmac"): parse_label(out, g, "mmac", p)}
            )
        unnamed_images(out, base / folder, named, csv_name)
    drop_conflicts(out)
    return out


READER = FormatReader("mmac", Options, read, "MMAC 2023 myopic maculopathy classification (META-PM 0-4)")
