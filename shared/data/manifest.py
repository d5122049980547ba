"""The manifest: the one table every format reader returns and everything downstream reads.

One row per image. Columns (`validate_manifest` enforces names, types and value sets):

| column | type | meaning |
|---|---|---|
| image_id | str | unique within the site (IDRiD numbering restarts per split: its ids carry the split) |
| path | str | absolute path of the image file |
| patient_id | str | person; folds and splits group by it (EyePACS `<patient>_left/right`, UKB `eid`) |
| eye | str | "left", "right" or "" when unknown; never guessed from the image's orientation |
| site | str | the site's name |
| split | str | the dataset's own split: "train", "val", "test", or "" when it has none |
| fold | int | cross-validation fold, -1 until assigned |
| gradable | boolean | False where the dataset marks the image ungradable; NA when unknown |
| label_<task> | Int64 | one column per task the site holds (labels.TASKS), NA = not labelled |
| mask_<lesion> | str | lesion-mask path ("" when that mask is absent: "no lesion annotated") |
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from shared.data.labels import TASKS, Task, generic_task, label_column
from shared.errors import DataError

BASE_COLUMNS = ("image_id", "path", "patient_id", "eye", "site", "split", "fold", "gradable")
LESIONS = ("ma", "he", "ex", "se", "od")  # IDRiD's five segmentation classes
EYES = ("left", "right", "")
SPLITS = ("train", "val", "test", "")
MASK_PREFIX = "mask_"
LABEL_PREFIX = "label_"


def new_manifest(rows: list[dict], site: str, tasks: dict[str, int] | None = None) -> pd.DataFrame:
    """Build a validated manifest from reader rows (dicts with at least image_id, path, patient_id).

    Missing optional fields get their defaults; `tasks` maps generic task names to class counts for the
    `folder` format (known tasks take their class count from `labels.TASKS`).
    """
    df = pd.DataFrame(rows)
    defaults = {"eye": "", "site": site, "split": "", "fold": -1, "gradable": pd.NA}
    for column, value in defaults.items():
        if column not in df:
            df[column] = value
    df["site"] = site
    for column in [c for c in df.columns if c.startswith(MASK_PREFIX)]:
        df[column] = df[column].fillna("").astype(str)
    for column in [c for c in df.columns if c.startswith(LABEL_PREFIX)]:
        df[column] = pd.to_numeric(df[column], errors="coerce").astype("Int64")
    df["gradable"] = df["gradable"].astype("boolean")
    df["fold"] = df["fold"].astype("int64")
    ordered = [*BASE_COLUMNS, *sorted(c for c in df.columns if c not in BASE_COLUMNS)]
    df = df[ordered].reset_index(drop=True)
    validate_manifest(df, extra_tasks=tasks)
    return df


def label_tasks(df: pd.DataFrame, extra_tasks: dict[str, int] | None = None) -> list[Task]:
    """The tasks whose label columns the manifest carries."""
    out = []
    for column in df.columns:
        if column.startswith(LABEL_PREFIX):
            name = column[len(LABEL_PREFIX) :]
            if name in TASKS:
                out.append(TASKS[name])
            elif extra_tasks and name in extra_tasks:
                out.append(generic_task(name, extra_tasks[name]))
            else:
                out.append(generic_task(name, int(df[column].max()) + 1 if df[column].notna().any() else 1))
    return out


def validate_manifest(df: pd.DataFrame, extra_tasks: dict[str, int] | None = None) -> None:
    """Schema check; a violation is our reader's bug or an impossible dataset, reported in one line."""
    missing = [c for c in BASE_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"manifest lacks columns {missing}")
    if df["image_id"].duplicated().any():
        dupes = df.loc[df["image_id"].duplicated(), "image_id"].head(3).tolist()
        raise DataError(f"manifest: image_id must be unique within a site, repeated: {dupes}")
    for column, allowed in (("eye", EYES), ("split", SPLITS)):
        bad = sorted(set(df[column]) - set(allowed))
        if bad:
            raise DataError(f"manifest: column {column} has values {bad}; allowed: {allowed}")
    if (df["patient_id"].astype(str) == "").any():
        raise DataError("manifest: every row needs a patient_id (use the image id when a dataset has none)")
    for column in df.columns:
        if column.startswith(LABEL_PREFIX) and str(df[column].dtype) != "Int64":
            raise DataError(
                f"manifest: label column {column} must be nullable integer, got {df[column].dtype}"
            )
    for task in label_tasks(df, extra_tasks):
        values = df[label_column(task.name)].dropna()
        if ((values < 0) | (values >= task.num_classes)).any():
            raise DataError(
                f"manifest: {label_column(task.name)} has values outside 0..{task.num_classes - 1}; "
                "readers must report and exclude such rows"
            )


def labelled(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """Rows labelled for `task` and not marked ungradable."""
    column = label_column(task)
    if column not in df:
        return df.iloc[0:0]
    keep = df[column].notna() & (df["gradable"].fillna(True))
    return df[keep]


def write_manifest_csv(df: pd.DataFrame, path: Path) -> None:
    """Save a manifest (NA labels as empty cells) atomically."""
    from shared.rundir import atomic_write_text

    atomic_write_text(path, df.to_csv(index=False))


def empty_manifest(site: str) -> pd.DataFrame:
    """A manifest with no rows but every base column, typed."""
    return new_manifest([{"image_id": "_", "path": "", "patient_id": "_"}], site).iloc[0:0]


def read_manifest_csv(path: Path) -> pd.DataFrame:
    """Load a manifest saved by `write_manifest_csv`, restoring its column types."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if df.empty:
        return empty_manifest(path.parent.name)
    df["gradable"] = df["gradable"].map({"True": True, "False": False, "": pd.NA})
    for column in df.columns:
        if column.startswith(LABEL_PREFIX):
            df[column] = df[column].replace("", pd.NA)
    site = df["site"].iloc[0] if len(df) else path.parent.name
    return new_manifest(df.to_dict("records"), site)


def task_classes(df: pd.DataFrame) -> dict[str, int]:
    """Class count of every task the manifest has a label column for: known tasks' own; for a generic
    (folder) task, its highest label + 1."""
    return {t.name: t.num_classes for t in label_tasks(df)}


def labelled_counts(df: pd.DataFrame) -> dict[str, int]:
    """Tasks with at least one usable label in the manifest, and how many labelled images each has."""
    counts = {
        c[len(LABEL_PREFIX) :]: len(labelled(df, c[len(LABEL_PREFIX) :]))
        for c in df
        if c.startswith(LABEL_PREFIX)
    }
    return {t: n for t, n in sorted(counts.items()) if n}
