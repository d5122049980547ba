"""Messidor-2: images in `IMAGES/` (about 2/3 `*.png`, 1/3 upper-case `*.JPG`: names are matched exactly,
case included) with Google's adjudicated grades in `messidor_data.csv`: `image_id` (WITH extension),
`adjudicated_dr_grade` (empty for ungradable images), `adjudicated_dme`, `adjudicated_gradable`.

The exam pairing (`messidor-2.csv`, one exam per row, the two image names separated by `;`) gives the patient
grouping; without it every image is its own subject. Ungradable images stay in the manifest, marked
gradable=False and unlabelled, so pretraining can still use them.
"""

from __future__ import annotations

from pathlib import Path

from shared.config import Strict
from shared.data.formats.common import (
    IMAGE_EXTENSIONS,
    FormatReader,
    Rows,
    add_row,
    drop_conflicts,
    parse_label,
    read_csv,
    unnamed_images,
)
from shared.data.labels import label_column

GRADE, DME, GRADABLE = "adjudicated_dr_grade", "adjudicated_dme", "adjudicated_gradable"


class Options(Strict):
    images_dir: str = "IMAGES"
    grades: str = "messidor_data.csv"
    exams: str | None = "messidor-2.csv"


def read(root: Path, opt: Options) -> Rows:
    out = Rows(root)
    exam_of = _exams(root / opt.exams) if opt.exams else {}
    df = read_csv(out, root / opt.grades, ("image_id", GRADE, GRADABLE))
    if df is None:
        return out
    named: set[Path] = set()
    for rec in df.to_dict("records"):
        path = root / opt.images_dir / rec["image_id"]
        named.add(path)
        gradable = rec[GRADABLE] != "0"
        row = {
            "image_id": rec["image_id"],
            "patient_id": exam_of.get(rec["image_id"], rec["image_id"]),
            "gradable": gradable,
        }

        def labels(r: dict = rec, p: Path = path, ok: bool = gradable) -> dict:
            if not ok:
                return {}
            return {
                label_column("dr"): parse_label(out, r[GRADE], "dr", p),
                label_column("dme"): parse_label(out, r.get(DME, ""), "dme", p),
            }

        add_row(out, path, row, labels)
    unnamed_images(out, root / opt.images_dir, named, opt.grades)
    drop_conflicts(out)
    return out


def _exams(path: Path) -> dict[str, str]:
    """image name -> exam id from the pairing file; any `;`-separated row naming two images is one exam."""
    if not path.is_file():
        return {}
    mapping: dict[str, str] = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines()):
        names = [t.strip() for t in line.split(";") if Path(t.strip()).suffix.lower() in IMAGE_EXTENSIONS]
        for name in names:
            mapping[name] = f"exam{number:04d}"
    return mapping


READER = FormatReader(
    "messidor2", Options, read, "Messidor-2 with adjudicated grades (DR 0-4, DME, gradability)"
)
