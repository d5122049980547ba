"""EyePACS / Kaggle DR 2015: `train/<patient>_<left|right>.jpeg` + `trainLabels.csv` (image,level), and
`test/*.jpeg` + `retinopathy_solution.csv` (image,level,Usage) where Usage Public -> val, Private -> test.

An unlabelled pool (Kaggle's test set before its solution was released, or a clinic's unread screening
images) is read with `labels: null, solution: null, unlabelled_dir: test`: every image, no labels, for
pretraining. Patients have two eyes, so patient_id is the number before `_left`/`_right`. Some images are
stored inverted (a notch on the rim marks the upright ones); the eye always comes from the file name,
never from a flip.
"""

from __future__ import annotations

from collections.abc import Callable
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

USAGE_SPLIT = {"Public": "val", "Private": "test"}


class Options(Strict):
    labels: str | None = "trainLabels.csv"  # None: no labelled train split
    train_dir: str = "train"
    solution: str | None = "retinopathy_solution.csv"  # test labels; None or absent file = no test split
    test_dir: str = "test"
    extension: str = ".jpeg"
    unlabelled_dir: str | None = None  # images listed without labels (no CSV names them)


def read(root: Path, opt: Options) -> Rows:
    out = Rows(root)
    named: set[Path] = set()
    sources = [(opt.labels, opt.train_dir, ("image", "level"))] if opt.labels else []
    if opt.solution and (root / opt.solution).exists():
        sources.append((opt.solution, opt.test_dir, ("image", "level", "Usage")))
    for csv_name, folder, required in sources:
        df = read_csv(out, root / csv_name, required)
        if df is None:
            continue
        for rec in df.itertuples(index=False):
            path = root / folder / f"{rec.image}{opt.extension}"
            named.add(path)
            usage = getattr(rec, "Usage", None)
            split = USAGE_SPLIT.get(usage, "") if usage is not None else "train"
            if usage is not None and not split:
                out.problem("bad-usage", path, f"Usage {usage!r} is neither Public nor Private")
                continue
            _add(
                out,
                path,
                rec.image,
                {"split": split},
                lambda r=rec, p=path: {label_column("dr"): parse_label(out, r.level, "dr", p)},
                root / csv_name,
            )
        unnamed_images(out, root / folder, named, csv_name)
    if opt.unlabelled_dir:
        for path in sorted((root / opt.unlabelled_dir).glob(f"*{opt.extension}")):
            if path not in named:
                _add(out, path, path.stem, {}, lambda: {})
    drop_conflicts(out)
    return out


def _add(
    out: Rows, path: Path, name: str, extra: dict, parse: Callable[[], dict], named_in: Path | None = None
) -> None:
    """One image named `<patient>_<left|right>`; a bad name is reported against the CSV naming it."""
    patient, _, eye = name.rpartition("_")
    if eye not in ("left", "right") or not patient:
        out.problem("bad-name", named_in or path, f"image {name!r} is not <patient>_<left|right>")
        return
    add_row(out, path, {"image_id": name, "patient_id": patient, "eye": eye} | extra, parse)


READER = FormatReader(
    "eyepacs", Options, read, "EyePACS / Kaggle DR 2015 (DR grades 0-4, two eyes per patient)"
)
