"""The privacy ledger: every DP step a data holder ever released, in its own state folder, never forgotten.

One JSON line per event, appended by rewriting the file through a temporary file and a rename, so a SIGKILL
at any point leaves either the old ledger or the new one, never a torn line:
- `plan`: a run's first private round at this site: the noise chosen for the run's whole plan;
- `release`: steps whose result left (a round's reply, a centralised model's export), with the epsilon of
  the whole ledger after them;
- `refused`: a round the site would not train, because it would have crossed the budget.
Nothing is ever removed or rolled back (a server that resumes re-runs rounds that really were released).
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
        return [
            (float(s), float(q), int(n))
            for e in self.entries()
            if e["kind"] == "release" and (model is None or e.get("model") == model)
            for s, q, n in e["mechanisms"]
        ]

    def epsilon(self, delta: float, model: str | None = None) -> float:
        return epsilon(self.history(model), delta)

    def plan(self, run_uid: str) -> dict[str, Any] | None:
        """The noise plan a run made here, if it made one."""
        plans = [e for e in self.entries() if e["kind"] == "plan" and e.get("run_uid") == run_uid]
        return plans[0] if plans else None

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Add one entry atomically, under a lock (two runs at one site never lose each other's)."""
        entry = {"kind": kind, "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            old = self.path.read_text() if self.path.exists() else ""
            atomic_write_text(self.path, old + json.dumps(entry, sort_keys=True) + "\n")
        return entry


def data_fingerprint(image_ids: Iterable[str]) -> str:
    """Which images a ledger's steps used (sorted ids, hashed): an audit sees when a site's data changed."""
    digest = hashlib.sha256("\n".join(sorted(map(str, image_ids))).encode()).hexdigest()
    return f"sha256:{digest[:16]}"
