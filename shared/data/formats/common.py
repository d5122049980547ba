"""What every format reader shares: problems, CSV reading with helpful column errors, label parsing.

Readers never decode images (that is `site check`'s job) and never hard-code dataset sizes: they list what
the CSVs name and what the folders hold, and report every mismatch as a `Problem` against its file.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel

from shared.data.labels import TASKS, label_column

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a site, against the file it concerns.

    `fatal` problems make the site unusable as it stands (a CSV without its label column); the others
    exclude only the row or file concerned (`excluded=True`), or are notes (`excluded=False`).
    """

    kind: str
    file: str
    reason: str
    fatal: bool = False
    excluded: bool = True

    def line(self) -> str:
        level = "FATAL" if self.fatal else ("excluded" if self.excluded else "note")
        return f"{level}: {self.file}: {self.reason}"


@dataclass
class Rows:
    """Accumulates manifest rows and problems while a reader walks a dataset."""

    root: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    tasks: dict[str, int] = field(default_factory=dict)  # generic (folder-format) tasks and class counts

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def problem(
        self, kind: str, path: Path | str, reason: str, *, fatal: bool = False, excluded: bool = True
    ):
        where = self.rel(path) if isinstance(path, Path) else path
        self.problems.append(Problem(kind, where, reason, fatal=fatal, excluded=excluded))


@dataclass(frozen=True)
class FormatReader:
    """A dataset format: its typed options and the function that lists the site's images."""

    name: str
    options: type[BaseModel]
    read: Callable[[Path, Any], Rows]
    description: str


def read_csv(
    out: Rows, path: Path, required: Iterable[str], *, sep: str = ",", what: str = "labels CSV"
) -> pd.DataFrame | None:
    """Read a CSV as strings with stripped header names (IDRiD's have trailing spaces) and no blank rows.

    A missing file or a missing required column is a fatal problem (returns None); the message suggests the
    closest existing column, since a misspelt header is the usual cause.
    """
    if not path.is_file():
        out.problem("missing-csv", path, f"{what} not found", fatal=True)
        return None
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=True)
    except pd.errors.EmptyDataError:
        out.problem("bad-csv", path, f"{what} is empty (0 bytes or no header row)", fatal=True)
        return None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        out.problem("bad-csv", path, f"cannot parse {what}: {str(exc).splitlines()[0]}", fatal=True)
        return None
    df.columns = [str(c).strip() for c in df.columns]
    df = df.loc[:, [c for c in df.columns if not c.startswith("Unnamed:")]]
    df = df[~(df.apply(lambda r: "".join(r).strip(), axis=1) == "")] if len(df) else df
    absent = [c for c in required if c not in df.columns]
    if absent:  # one problem, one line, however many columns are missing
        columns = list(df.columns)
        hints = [
            f"found {close[0]!r}" + (f" for {c!r}" if len(absent) > 1 else "")
            for c in absent
            if (close := difflib.get_close_matches(c, columns, n=1, cutoff=0.6))
        ]
        hint = f" ({', '.join(hints)}: misspelt header?)" if hints else f"; columns are {columns[:8]}"
        names = ", ".join(map(repr, absent))
        what = f"required column {names} is" if len(absent) == 1 else f"required columns {names} are"
        out.problem("missing-column", path, f"{what} missing{hint}", fatal=True)
        return None
    return df.map(str.strip)


def parse_label(
    out: Rows, raw: str, task: str, where: Path | str, num_classes: int | None = None
) -> int | None:
    """An integer label in the task's range, or None; a bad value is a problem that excludes the row.

    Empty strings are "not labelled" (Messidor-2's ungradable images) and return None silently.
    """
    raw = raw.strip()
    if raw == "":
        return None
    num_classes = num_classes or TASKS[task].num_classes
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value.is_integer() or not 0 <= value < num_classes:
        out.problem(
            "bad-label",
            where,
            f"{label_column(task)} = {raw!r} is outside the task's range 0..{num_classes - 1}",
        )
        raise _ExcludeRow
    return int(value)


class _ExcludeRow(Exception):
    """Raised by `parse_label` after reporting, so the reader skips the row."""


def add_row(out: Rows, path: Path, row: dict[str, Any], parse: Callable[[], dict[str, Any]]) -> None:
    """Append `row` plus the labels `parse()` returns, unless the image is outside the dataset's folder (a
    CSV naming `../x.jpeg` or `/etc/passwd`: a site reads its dataset, nothing else), missing, or a label
    is bad."""
    if not Path(os.path.normpath(path)).is_relative_to(os.path.normpath(out.root)):
        out.problem("outside-root", str(path), "named in the labels CSV but outside the dataset's folder")
        return
    if not path.is_file():
        out.problem("missing-file", path, "named in the labels CSV but the file does not exist")
        return
    try:
        labels = parse()
    except _ExcludeRow:
        return
    out.rows.append({**row, "path": str(path), **labels})


def drop_conflicts(out: Rows, key: str = "image_id") -> None:
    """Rows listed twice: identical ones collapse to one; conflicting labels exclude both, reported."""
    seen: dict[str, dict[str, Any]] = {}
    conflicted: set[str] = set()
    for row in out.rows:
        other = seen.get(row[key])
        if other is None:
            seen[row[key]] = row
        elif _labels(other) != _labels(row):
            conflicted.add(row[key])
            out.problem(
                "conflicting-labels",
                Path(row["path"]),
                f"listed twice with labels {_labels(other)} and "
                f"{_labels(row)}; both excluded until the source is fixed",
            )
    out.rows = [r for k, r in seen.items() if k not in conflicted]


def drop_eye_conflicts(out: Rows) -> None:
    """One patient's eye graded differently in two rows (two files, or two CSVs): exclude them all, reported.

    Only rows with a known eye are compared; per-person tasks (AD/PD) agree by construction.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in out.rows:
        if row.get("eye"):
            groups.setdefault((row["patient_id"], row["eye"]), []).append(row)
    bad: set[int] = set()
    for (patient, eye), rows in groups.items():
        for column in {k for r in rows for k in _labels(r)}:
            values = {r.get(column) for r in rows if r.get(column) is not None}
            if len(values) > 1:
                for r in rows:
                    bad.add(id(r))
                    out.problem(
                        "conflicting-labels",
                        Path(r["path"]),
                        f"patient {patient} {eye} eye has "
                        f"{column} values {sorted(values)} across its images; excluded",
                    )
    out.rows = [r for r in out.rows if id(r) not in bad]


def unnamed_images(out: Rows, folder: Path, named: set[Path], what: str) -> None:
    """Report image files in `folder` that no CSV names (kept out of the manifest, never silently)."""
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and path not in named:
            out.problem("unnamed-file", path, f"image file not named in {what}; not used", excluded=False)


def _labels(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k.startswith("label_")}
