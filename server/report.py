"""The end-of-run summary: one table of both phases, per round, read from the run store."""

from __future__ import annotations

import math
from collections import defaultdict

from server.store import RunStore

SHOWN = ("auc", "kappa")


def summary_table(store: RunStore) -> str:
    rounds = store.query(
        "SELECT phase, round, sampled, accepted, status FROM rounds WHERE run_id = ? "
        "ORDER BY phase DESC, round",
        (store.run_id,),
    )
    values: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for row in store.query(
        "SELECT phase, round, source, key, value FROM metrics WHERE run_id = ?", (store.run_id,)
    ):
        values[(row["phase"], row["round"])][f"{row['source']}:{row['key']}"] = row["value"]
    eval_keys = sorted(
        {
            k.split(":", 1)[1]
            for v in values.values()
            for k in v
            if k.startswith("federated-eval:") and k.rsplit("-", 1)[-1] in SHOWN
        }
    )
    header = ["phase", "round", "sites", "train loss", "probe loss", *eval_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rounds:
        v = values.get((r["phase"], r["round"]), {})
        cells = [
            r["phase"],
            str(r["round"]),
            f"{r['accepted'] or 0}/{r['sampled'] or 0}",
            _fmt(v.get("train:train-loss")),
            _fmt(v.get("server-probe:probe-loss")),
            *(_fmt(v.get(f"federated-eval:{k}")) for k in eval_keys),
        ]
        if r["status"] not in ("ok", "running"):
            cells[2] += f" ({r['status']})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
