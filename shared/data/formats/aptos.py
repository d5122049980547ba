"""APTOS 2019: `train.csv` (id_code,diagnosis) with `train_images/<id_code>.png`; `test.csv` (id_code) with
`test_images/` has no public labels, so test images join the manifest unlabelled (useful for pretraining).
There are no patient ids: each image is its own subject.
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


class Options(Strict):
    labels: str = "train.csv"
    train_dir: str = "train_images"
    test_csv: str | None = "test.csv"
    test_dir: str = "test_images"
    extension: str = ".png"


def read(root: Path, opt: Options) -> Rows:
    out = Rows(root)
    sources = [(opt.labels, opt.train_dir, ("id_code", "diagnosis"), "train")]
    if opt.test_csv and (root / opt.test_csv).exists():
        sources.append((opt.test_csv, opt.test_dir, ("id_code",), "test"))
    for csv_name, folder, required, split in sources:
        df = read_csv(out, root / csv_name, required)
        if df is None:
            continue
        named: set[Path] = set()
        for rec in df.itertuples(index=False):
            path = root / folder / f"{rec.id_code}{opt.extension}"
            named.add(path)
            row = {"image_id": rec.id_code, "patient_id": rec.id_code, "split": split}
            raw = getattr(rec, "diagnosis", "")
            add_row(out, path, row, lambda r=raw, p=path: {label_column("dr"): parse_label(out, r, "dr", p)})
        unnamed_images(out, root / folder, named, csv_name)
    drop_conflicts(out)
    return out


READER = FormatReader(
    "aptos", Options, read, "APTOS 2019 blindness detection (DR grades 0-4, no patient ids)"
)
