"""Any other dataset: either a CSV (`path,label[,patient_id]`, paths relative to the root) or one folder per
class (`<root>/<class>/*.png`, classes numbered in sorted order). The label becomes task `task`.
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
from shared.data.labels import TASKS, label_column


class Options(Strict):
    csv: str | None = None
    task: str = "label"
    num_classes: int | None = None  # CSV mode: inferred as max label + 1 when not given


def read(root: Path, opt: Options) -> Rows:
    out = Rows(root)
    if opt.csv:
        _from_csv(out, root, opt)
    else:
        _from_folders(out, root, opt)
    drop_conflicts(out)
    return out


def _from_csv(out: Rows, root: Path, opt: Options) -> None:
    df = read_csv(out, root / opt.csv, ("path", "label"))
    if df is None:
        return
    numbers = [int(v) for v in df["label"] if v.isdigit()]
    k = opt.num_classes or _known_classes(opt.task) or (max(numbers) + 1 if numbers else 0)
    if not k:
        out.problem(
            "labels",
            root / opt.csv,
            "no integer in column `label`; labels are class numbers 0, 1, ...",
            fatal=True,
        )
        return
    out.tasks[opt.task] = k
    named: set[Path] = set()
    for rec in df.to_dict("records"):
        path = root / rec["path"]
        named.add(path)
        image_id = str(Path(rec["path"]).with_suffix(""))
        row = {"image_id": image_id, "patient_id": rec.get("patient_id") or image_id}
        add_row(
            out,
            path,
            row,
            lambda r=rec, p=path: {label_column(opt.task): parse_label(out, r["label"], opt.task, p, k)},
        )
    unnamed_images(out, root, named, opt.csv)


def _from_folders(out: Rows, root: Path, opt: Options) -> None:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        out.problem(
            "empty", root, "no class folders found; give options.csv for a CSV-listed dataset", fatal=True
        )
        return
    out.tasks[opt.task] = len(classes)
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                image_id = str(path.relative_to(root).with_suffix(""))
                add_row(
                    out,
                    path,
                    {"image_id": image_id, "patient_id": image_id},
                    lambda v=label: {label_column(opt.task): v},
                )


def _known_classes(task: str) -> int | None:
    return TASKS[task].num_classes if task in TASKS else None


READER = FormatReader("folder", Options, read, "generic: a CSV of path,label or one folder per class")
