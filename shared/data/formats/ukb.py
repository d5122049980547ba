"""UK Biobank fundus photographs: `<eid>_<21015|21016>_<instance>_<array>.png` (field 21015 = left eye,
21016 = right eye), in one folder or in the Research Analysis Platform's bucket sub-folders.

Labels are optional. `outcomes` names a main-dataset extract (`eid` plus columns
`<field>-<instance>.<array>`); a participant is an AD case if any of fields 42020 / 131036 / 130836 holds a
real date, a PD case for 42032 / 131022, and a control otherwise. UKB's placeholder dates (1900-01-01,
1901-01-01, 1902-02-02, 1903-03-03, 2037-07-07) count as missing. Participants absent from the extract stay
unlabelled. Patient = eid, so both eyes and every visit of one person share a fold.
"""

from __future__ import annotations

import re
from pathlib import Path

from shared.config import Strict
from shared.data.formats.common import FormatReader, Rows, add_row, read_csv
from shared.data.labels import label_column

NAME = re.compile(r"^(?P<eid>\d+)_(?P<field>21015|21016)_(?P<instance>\d+)_(?P<array>\d+)\.png$")
EYE = {"21015": "left", "21016": "right"}
PLACEHOLDER_DATES = {"1900-01-01", "1901-01-01", "1902-02-02", "1903-03-03", "2037-07-07"}


class Options(Strict):
    images_dir: str = "."
    outcomes: str | None = None
    ad_fields: tuple[str, ...] = ("42020", "131036", "130836")
    pd_fields: tuple[str, ...] = ("42032", "131022")


def read(root: Path, opt: Options) -> Rows:
    out = Rows(root)
    labels = _outcomes(out, root / opt.outcomes, opt) if opt.outcomes else {}
    for path in sorted((root / opt.images_dir).rglob("*.png")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # the site's own state folder
        match = NAME.match(path.name)
        if not match:
            out.problem(
                "bad-name",
                path,
                "not a UK Biobank fundus file name <eid>_<21015|21016>_<inst>_<array>.png",
                excluded=False,
            )
            continue
        eid = match["eid"]
        row = {"image_id": path.stem, "patient_id": eid, "eye": EYE[match["field"]]}
        add_row(out, path, row, lambda e=eid: labels.get(e, {}))
    return out


def _outcomes(out: Rows, path: Path, opt: Options) -> dict[str, dict[str, int]]:
    df = read_csv(out, path, ("eid",), what="outcomes extract")
    if df is None:
        return {}
    result: dict[str, dict[str, int]] = {}
    for task, fields in (("ad", opt.ad_fields), ("pd", opt.pd_fields)):
        columns = [c for c in df.columns if c.split("-")[0] in fields]
        if not columns:
            out.problem(
                "missing-column",
                path,
                f"no column for any of fields {list(fields)} ({task} dates); expected e.g. '{fields[0]}-0.0'",
                fatal=True,
            )
            continue
        dates = df[columns].apply(lambda col: col.where(~col.isin(PLACEHOLDER_DATES) & (col != "")))
        case = dates.notna().any(axis=1)
        for eid, is_case in zip(df["eid"], case, strict=True):
            result.setdefault(eid, {})[label_column(task)] = int(is_case)
    return result


READER = FormatReader(
    "ukb", Options, read, "UK Biobank fundus photographs (fields 21015/21016), optional AD/PD"
)
