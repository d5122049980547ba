"""The privacy ledger: every DP step a data holder ever released, in its own state folder, never forgotten.

One JSON line per event, appended by rewriting the file through a temporary file and a rename, so a SIGKILL
at any point leaves either the old ledger or the new one, never a torn line:
- `plan`: a run's first private round at this site: the noise chosen for the run's whole plan;
- `release`: steps whose result left (a round's reply, a centralised model's export), with the epsilon of
  the whole ledger after them;
- `refused`: a round the site would not train, because it would have crossed the budget.
Nothing is ever removed or rolled back (a server that resumes re-runs rounds that really were released).

The ledger follows the patients, not the name of whoever trained on them: a site's release names the
patients it used (`patients`: the fingerprint of their sorted ids, whose list is kept once beside the ledger
in `<ledger>.patients/`), and a patient's epsilon composes every release that used them. One dataset has one
ledger, so a simulation that deals its patients into other parts under another seed still charges each
patient what earlier runs spent on them. A release that names no patients (centralised runs, older ledgers)
counts for every patient.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shared.errors import DataError
from shared.privacy.accounting import Mechanism, epsilon
from shared.rundir import atomic_write_text


class Ledger:
    """A ledger file; `path` need not exist yet (an empty ledger)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = None
            if not isinstance(entry, dict) or "kind" not in entry:
                raise DataError(
                    f"{self.path}:{number}: not a ledger entry; the ledger was edited by hand: restore it "
                    "from the site's backup (never delete it: that would forget what was released)"
                )
            out.append(entry)
        return out

    def history(self, model: str | None = None) -> list[Mechanism]:
        """Every released mechanism (of one `model` only, for centralised runs that train several)."""
        return [m for e in self._releases(model) for m in _mechanisms(e)]

    def histories(self, patients: Iterable[str]) -> list[list[Mechanism]]:
        """The distinct histories of `patients`: each patient's is every release that used them (a release
        naming no patients used all of them). Patients with the same releases share one history."""
        releases = self._releases(None)
        members = {fp: self._cohort(fp) for fp in {e["patients"] for e in releases if "patients" in e}}
        patterns = {
            tuple("patients" not in e or patient in members[e["patients"]] for e in releases)
            for patient in set(map(str, patients))
        }
        return [
            [m for e, used in zip(releases, pattern, strict=True) if used for m in _mechanisms(e)]
            for pattern in sorted(patterns)
        ] or [[]]

    def epsilon(self, delta: float, model: str | None = None, patients: Iterable[str] | None = None) -> float:
        """Epsilon at `delta` of the ledger's releases (of one `model`), or of the worst-off of `patients`."""
        if patients is None:
            return epsilon(self.history(model), delta)
        return max(epsilon(h, delta) for h in self.histories(patients))

    def patients(self) -> set[str]:
        """Every patient some release of this ledger named."""
        return set().union(*(self._cohort(e["patients"]) for e in self._releases(None) if "patients" in e))

    def cohort(self, patients: Iterable[str]) -> str:
        """The fingerprint naming this set of patients in release entries; the set is kept beside the ledger
        (once: the same patients always make the same file)."""
        ids = sorted(set(map(str, patients)))
        fingerprint = data_fingerprint(ids)
        path = self._cohort_path(fingerprint)
        if not path.exists():
            atomic_write_text(path, "".join(f"{i}\n" for i in ids))
        return fingerprint

    def plan(self, run_uid: str, site: str | None = None) -> dict[str, Any] | None:
        """The noise plan a run made here (for `site`, one of a dataset's simulated parts), if it made one."""
        plans = [
            e
            for e in self.entries()
            if e["kind"] == "plan" and e.get("run_uid") == run_uid and e.get("site", site) == site
        ]
        return plans[0] if plans else None

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Add one entry atomically, under a lock (two runs at one site never lose each other's). Entries are
        strict JSON: a value that is not a finite number is refused here, not found by the next reader."""
        entry = {"kind": kind, "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **fields}
        line = json.dumps(entry, sort_keys=True, allow_nan=False)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            old = self.path.read_text() if self.path.exists() else ""
            atomic_write_text(self.path, old + line + "\n")
        return entry

    def _releases(self, model: str | None) -> list[dict[str, Any]]:
        return [
            e for e in self.entries() if e["kind"] == "release" and (model is None or e.get("model") == model)
        ]

    def _cohort_path(self, fingerprint: str) -> Path:
        return self.path.with_suffix(".patients") / f"{fingerprint.removeprefix('sha256:')}.txt"

    def _cohort(self, fingerprint: str) -> set[str]:
        path = self._cohort_path(fingerprint)
        if not path.is_file():
            raise DataError(
                f"{path}: the patients of release {fingerprint} are missing; restore the ledger's folder "
                "from the site's backup (never delete it: that would forget what was released)"
            )
        return set(path.read_text().split())


def _mechanisms(entry: dict[str, Any]) -> list[Mechanism]:
    return [(float(s), float(q), int(n)) for s, q, n in entry["mechanisms"]]


def data_fingerprint(image_ids: Iterable[str]) -> str:
    """Which images a ledger's steps used (sorted ids, hashed): an audit sees when a site's data changed."""
    digest = hashlib.sha256("\n".join(sorted(map(str, image_ids))).encode()).hexdigest()
    return f"sha256:{digest[:16]}"
