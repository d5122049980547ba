"""What the dashboard shows, read from run stores only, never written (`server/store.py:StoreReader`, SQLite's
read-only mode: a live run's writes are never blocked and no table is ever created)."""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.report import TESTED, cross_site_matrices, final_test_rows
from server.store import StoreError, StoreReader
from shared.federation.wire import EPSILON, SECONDS, TRAIN_LOSS

# Beside a run's store when `fedretina compare` ran it: the centralised arm's validation curve of the same
# data and seed ([{"epochs": passes over the pooled images, "auc": ..., "kappa": ...}, ...]), overlaid.
CENTRALISED_CURVE = "centralised-curve.json"


@dataclass(frozen=True)
class Store:
    """One run store, `<root>/<name>/federation/store.sqlite`, named by its run folder under the root."""

    path: Path
    name: str

    @property
    def read(self) -> StoreReader:
        return StoreReader(self.path)


def stores(root: Path) -> list[Store]:
    """Every run store under `root` (a runs folder, or one run's folder)."""
    found = sorted(root.rglob("federation/store.sqlite"))
    return [Store(p, p.parent.parent.relative_to(root).as_posix() or root.name) for p in found]


def scenario_name(scenario: str | None) -> str:
    """A run's scenario as people name it: a YAML path's stem, a built-in scenario's name as it is."""
    return Path(scenario).stem if "/" in (scenario or "") else scenario or ""


def run_rows(root: Path) -> list[dict[str, Any]]:
    """The runs table: newest first, with progress, sites, elapsed time and a failed run's reason."""
    rows = []
    for store in stores(root):
        try:
            run = store.read.run()
        except StoreError:
            continue  # a damaged store: the runs table lists what it can read
        if run is None:
            continue
        config = json.loads(run["config"] or "{}")
        finished = run["finished"] or time.time()
        reason = ""
        if run["status"] == "failed":
            errors = [e for e in store.read.events() if e["level"] == "error"]
            reason = errors[-1]["message"] if errors else ""
        rows.append(
            {
                "name": store.name,
                "scenario": scenario_name(run["scenario"]),
                "strategy": run["strategy"],
                "status": run["status"],
                "progress": _progress(store, config),
                "sites": len({s["site"] for s in store.read.sites()}),
                "started": run["started"],
                "elapsed_s": finished - (run["started"] or finished),
                "reason": reason,
                "privacy": bool(config.get("privacy", {}).get("enabled")),
            }
        )
    return sorted(rows, key=lambda r: r["started"] or 0, reverse=True)


def _progress(store: Store, config: dict) -> str:
    """`phase k/N` of the run's latest round."""
    rounds = store.read.rounds()
    if not rounds:
        return "starting"
    last = max(rounds, key=lambda r: r["started"] or 0)
    total = config.get("federation", {}).get(f"rounds_{last['phase']}", "?")
    return f"{last['phase']} {last['round']}/{total}"


def run_detail(store: Store) -> dict[str, Any]:
    """Everything one run page shows, as JSON-ready data."""
    reader = store.read
    run = reader.run()
    if run is None:  # the store of a run this instant starting
        raise LookupError(f"{store.name} has not started yet")
    config = json.loads(run["config"] or "{}")
    rounds = reader.rounds()
    replies = reader.replies()
    for r in replies:
        r["fate"] = fate(r)
    metrics: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for m in reader.metrics():
        metrics[m["phase"]][f"{m['source']}:{m['key']}"].append([m["round"], _num(m["value"])])
    sites = sorted({r["site"] for r in replies} | {s["site"] for s in reader.sites()})
    return {
        "name": store.name,
        "run": {k: run[k] for k in ("run_name", "scenario", "strategy", "status", "started", "finished")},
        "planned": {p: config.get("federation", {}).get(f"rounds_{p}", 0) for p in ("pretrain", "finetune")},
        "privacy_unit": config.get("privacy", {}).get("unit")
        if config.get("privacy", {}).get("enabled")
        else None,
        "secure": bool(config.get("federation", {}).get("secure_aggregation")),
        "eta_s": _eta(rounds, config),
        "rounds": rounds,
        "sites": sites,
        "replies": [_reply(r) for r in replies],
        "metrics": {p: dict(v) for p, v in metrics.items()},
        "events": reader.events(),
        "probes": probes(store),
        "centralised": _centralised_curve(store, config),
        "final_test": [{m: _num(r.get(m)) for m in TESTED} | _named(r) for r in final_test_rows(reader)],
        "tested": TESTED,
        "cross_site": [
            m | {"rows": [r | {"cells": [_num(v) for v in r["cells"]]} for r in m["rows"]]}
            for m in cross_site_matrices(reader)
        ],
    }


def _centralised_curve(store: Store, config: dict) -> dict[str, dict[int, float | None]]:
    """{metric: {round: value}}: the centralised curve `fedretina compare` left beside the store, each epoch
    put on the nearest round of the same compute (the curve's last epoch is the run's last fine-tuning round,
    whatever the rounds' local epochs or steps); empty when there is none."""
    path = store.path.parent / CENTRALISED_CURVE
    rounds = config.get("federation", {}).get("rounds_finetune", 0)
    if not path.is_file() or not rounds:
        return {}
    points = json.loads(path.read_text())
    total = max((p["epochs"] for p in points), default=0)
    if not total:
        return {}
    out: dict[str, dict[int, float | None]] = {}
    off: dict[int, float] = {}  # how far the epoch shown at each round lies from it, in rounds
    for point in points:
        at = point["epochs"] * rounds / total
        rnd = round(at)
        if rnd < 1 or abs(at - rnd) >= off.get(rnd, 1.0):
            continue
        off[rnd] = abs(at - rnd)
        for key, value in point.items():
            if key != "epochs":
                out.setdefault(key, {})[rnd] = _num(value)
    return out


def probes(store: Store) -> list[str]:
    """The run's probe reconstructions (PNGs of public images), by round."""
    return sorted(p.name for p in (store.path.parent / "probes").glob("pretrain-r*.png"))


def fate(reply: dict) -> str:
    """What became of one site's reply: accepted, rejected (validation), refused (its privacy budget),
    failed (an error reply) or timed out."""
    if reply["accepted"]:
        return "accepted"
    reason = reply["reason"] or ""
    if reason.startswith("refused by the site"):
        return "refused"
    if reason.startswith("timed out"):
        return "timed out"
    if reply["error_code"] is not None:
        return "failed"
    return "rejected"


def _reply(r: dict) -> dict:
    m = r["metrics"]
    return {
        "phase": r["phase"],
        "round": r["round"],
        "kind": r["kind"],
        "site": r["site"],
        "attempt": r["attempt"],
        "fate": r["fate"],
        "reason": r["reason"] or "",
        "examples": r["num_examples"],
        "seconds": _num(r["duration"]),
        "bytes": r["bytes"],
        "update_norm": _num(r["update_norm"]),
        "cosine": _num(r["cosine"]),
        "aggregated": bool(r["aggregated"]),
        "train_loss": _num(m.get(TRAIN_LOSS)),
        "epsilon": _num(m.get(EPSILON)),
        "site_seconds": _num(m.get(SECONDS)),
    }


def _eta(rounds: list[dict], config: dict) -> float | None:
    """Seconds left at the median round time so far (None once nothing is left or nothing is known)."""
    done = [r["finished"] - r["started"] for r in rounds if r["finished"] and r["started"]]
    planned = sum(config.get("federation", {}).get(f"rounds_{p}", 0) for p in ("pretrain", "finetune"))
    left = planned - len(done)
    if not done or left <= 0:
        return None
    done.sort()
    return done[len(done) // 2] * left


def _named(row: dict) -> dict:
    """A final test row's site, task and test images (its metrics apart)."""
    return {k: row[k] for k in ("site", "task", "images")}


def _num(value: Any) -> float | None:
    """A JSON-safe number: NaN and infinities become None."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
