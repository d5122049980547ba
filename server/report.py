"""What people read about a run, from the run store alone: the console's line per round, and the
end-of-run table of both phases, with the final model's scores on each site's held-out test patients."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict

from server.store import CROSS_KIND, TEST_KIND, StoreReader
from shared.federation.wire import EPSILON, SECONDS, TRAIN_LOSS

SHOWN = ("auc", "kappa")  # per task in the summary table; the console line adds accuracy
TESTED = ("referable_auc", "auc", "kappa", "accuracy", "f1_weighted")  # the final test table's columns
MEAN = "image-weighted mean"  # the final test table's row over several sites


def round_line(store: StoreReader, phase: str, rnd: int, total: int) -> str:
    """One line for round `rnd` of `phase`, e.g. `pretrain round 2/3: 4/4 sites, loss 0.3807, probe 0.6014,
    site time 26.2 s median / 29.3 s max, 7.9 MB per reply`, and under DP the largest site epsilon."""
    rows = [r for r in store.rounds(phase) if r["round"] == rnd]
    v = {f"{m['source']}:{m['key']}": m["value"] for m in store.metrics(phase) if m["round"] == rnd}
    sent = [x for x in store.replies(phase, "train") if x["round"] == rnd and x["accepted"]]
    r = rows[0] if rows else {"sampled": 0, "accepted": 0, "status": ""}
    parts = [f"{r['accepted'] or 0}/{r['sampled'] or 0} sites"]
    if r["status"] not in ("ok", "running", ""):
        parts[0] += f" ({r['status']})"
    parts += [f"loss {v[f'train:{TRAIN_LOSS}']:.4f}"] if f"train:{TRAIN_LOSS}" in v else []
    parts += [f"probe {v['server-probe:probe-loss']:.4f}"] if "server-probe:probe-loss" in v else []
    evaluated = sorted(
        {
            k[len("federated-eval:") : -len("-auc")]
            for k in v
            if k.startswith("federated-eval:") and k.endswith("-auc")
        }
    )
    for task in evaluated:
        parts.append(
            " ".join(
                [
                    task,
                    *(
                        f"{m} {v[f'federated-eval:{task}-{m}']:.3f}"
                        for m in SHOWN
                        if f"federated-eval:{task}-{m}" in v
                    ),
                ]
            )
        )
    median, worst = v.get(f"train:{SECONDS}-median"), v.get(f"train:{SECONDS}-max")
    parts += [f"site time {median:.1f} s median / {worst:.1f} s max"] if median is not None else []
    parts += [f"{statistics.median(x['bytes'] for x in sent) / 1e6:.1f} MB per reply"] if sent else []
    if (spent := v.get(f"train:{EPSILON}-max")) is not None:
        parts.append(f"epsilon {spent:.3f} max ({privacy_unit(store)} level)")
    return f"{phase} round {rnd}/{total}: " + ", ".join(parts)


def privacy_unit(store: StoreReader) -> str:
    """What the run's epsilon protects (a patient or an image), from its recorded config."""
    run = store.run()
    return json.loads(run["config"])["privacy"]["unit"] if run else "unknown"


def summary_table(store: StoreReader) -> str:
    rounds = store.rounds()
    values: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for row in store.metrics():
        values[(row["phase"], row["round"])][f"{row['source']}:{row['key']}"] = row["value"]
    eval_keys = sorted(
        {
            k.split(":", 1)[1]
            for v in values.values()
            for k in v
            if k.startswith("federated-eval:") and k.rsplit("-", 1)[-1] in SHOWN
        }
    )
    private = any(f"train:{EPSILON}-max" in v for v in values.values())
    header = ["phase", "round", "sites", "train loss", "probe loss", *eval_keys]
    header += [f"epsilon max ({privacy_unit(store)})"] if private else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rounds:
        v = values.get((r["phase"], r["round"]), {})
        cells = [
            r["phase"],
            str(r["round"]),
            f"{r['accepted'] or 0}/{r['sampled'] or 0}",
            _fmt(v.get(f"train:{TRAIN_LOSS}")),
            _fmt(v.get("server-probe:probe-loss")),
            *(_fmt(v.get(f"federated-eval:{k}")) for k in eval_keys),
            *([_fmt(v.get(f"train:{EPSILON}-max"))] if private else []),
        ]
        if r["status"] not in ("ok", "running"):
            cells[2] += f" ({r['status']})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + final_test_table(store) + cross_site_table(store)


def final_test_rows(store: StoreReader, kind: str = TEST_KIND) -> list[dict]:
    """The final model's scores at each site that holds a task's test images: site, task, test images and
    the metrics (`TESTED`) it sent; then, per task over several sites, their image-weighted mean (the sites
    keep their predictions, so pooled metrics cannot be computed here). `kind` "cross:<site>": the scores
    of that site's local model instead."""
    rows = []
    for reply in store.replies(kind=kind):
        metrics = reply["metrics"]
        tasks = sorted({k[: -len("-num-examples")] for k in metrics if k.endswith("-num-examples")})
        for task in tasks:
            images = int(metrics[f"{task}-num-examples"])
            if images:
                shown = {m: metrics[f"{task}-{m}"] for m in TESTED if f"{task}-{m}" in metrics}
                rows.append({"site": reply["site"], "task": task, "images": images} | shown)
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        if len(mine) > 1:
            total = sum(r["images"] for r in mine)
            mean = {
                m: sum(r[m] * r["images"] for r in mine) / total
                for m in TESTED
                if all(m in r and not math.isnan(r[m]) for r in mine)
            }
            rows.append({"site": MEAN, "task": task, "images": total} | mean)
    return rows


def final_test_table(store: StoreReader) -> str:
    """`final_test_rows` as markdown ("" when the run made no final test)."""
    rows = final_test_rows(store)
    if not rows:
        return ""
    header = ["site", "task", "test images", *TESTED]
    lines = [
        "\nThe final model on each site's held-out test patients (never trained on, never used to choose a "
        "round):\n",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in rows:
        cells = [r["site"], r["task"], str(r["images"]), *(_fmt(r.get(m)) for m in TESTED)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


FEDERATED = "federated"  # the cross-site table's name for the final (global) model


def cross_site_rows(store: StoreReader) -> list[dict]:
    """The cross-site table's cells: each model (the federated one, then each site's own local model of the
    last round) scored by each site on its own test patients: model, site, task, images, metrics."""
    kinds = sorted({r["kind"] for r in store.replies(kind=CROSS_KIND + "%")})
    if not kinds:
        return []
    rows = []
    for kind in [TEST_KIND, *kinds]:
        model = FEDERATED if kind == TEST_KIND else kind.removeprefix(CROSS_KIND)
        rows += [{"model": model} | r for r in final_test_rows(store, kind) if r["site"] != MEAN]
    return rows


def cross_site_matrices(store: StoreReader) -> list[dict]:
    """Per task, the cross-site matrix of its headline metric (referable AUC for DR, else AUC): `sites`
    (the columns: who scores), `rows` ({"model", "cells"}: the federated model first, then each site's
    own), a cell None where that site holds no test image of the task."""
    rows = cross_site_rows(store)
    out = []
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        metric = "referable_auc" if any("referable_auc" in r for r in mine) else "auc"
        sites = sorted({r["site"] for r in mine})
        cell = {(r["model"], r["site"]): r.get(metric) for r in mine}
        models = [FEDERATED, *sorted({r["model"] for r in mine} - {FEDERATED})]
        matrix = [{"model": m, "cells": [cell.get((m, s)) for s in sites]} for m in models]
        out.append({"task": task, "metric": metric, "sites": sites, "rows": matrix})
    return out


def cross_site_table(store: StoreReader) -> str:
    """`cross_site_matrices` as markdown ("" when the run made none)."""
    lines = []
    for m in cross_site_matrices(store):
        lines += [
            f"\nCross-site {m['task']} {m['metric']} (row: the model, the federated one or a site's own "
            "model of the last round; column: the site scoring it on its held-out test patients):\n",
            "| model | " + " | ".join(m["sites"]) + " |",
            "|" + "---|" * (len(m["sites"]) + 1),
        ]
        for row in m["rows"]:
            shown = row["model"] if row["model"] == FEDERATED else f"trained at {row['model']}"
            lines.append(f"| {shown} | " + " | ".join(_fmt(v) for v in row["cells"]) + " |")
    return "\n".join(lines) + ("\n" if lines else "")


def _fmt(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
