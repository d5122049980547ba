"""From a run's data to what its page draws: chart specs (rounds on x, one series per site or metric) for
the browser's uPlot, the participation grid, the straggler table. Pure functions of `data.run_detail`."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

Chart = dict[str, Any]
SLOW = 1.5  # a site is flagged slow when its round took this many times the round's median
# a reply's fate as the participation grid writes it (one letter each: refused is the Site's own refusal)
FATE_LETTERS = {"accepted": "A", "rejected": "R", "refused": "S", "failed": "F", "timed out": "T"}
# The per-site curves of each phase: (chart id, title, reply field, y label).
HIDDEN_BY_SECURE_AGGREGATION = ("norm", "cosine")  # the server never sees one site's update
PER_SITE = (
    ("site-loss", "train loss per site", "train_loss", "loss"),
    ("examples", "examples per site", "examples", "images"),
    ("seconds", "seconds per site", "seconds", "s"),
    ("norm", "update norm per site", "update_norm", "L2"),
    ("cosine", "cosine to the aggregate (drift)", "cosine", ""),
    ("bytes", "bytes sent per site", "bytes", "bytes"),
)


def chart(cid: str, title: str, series: dict[str, dict[int, float | None]], ylabel: str = "") -> Chart | None:
    """A chart over rounds from {label: {round: value}}; None when there is nothing to draw."""
    rounds = sorted({r for values in series.values() for r in values})
    if not rounds or all(v is None for values in series.values() for v in values.values()):
        return None
    return {
        "id": cid,
        "title": title,
        "ylabel": ylabel,
        "x": rounds,
        "series": [{"label": k, "values": [v.get(r) for r in rounds]} for k, v in series.items()],
    }


def per_site(detail: dict, phase: str, field: str) -> dict[str, dict[int, float | None]]:
    """{site: {round: the reply's `field`}} of train replies that reached the server (the last attempt of
    each round); failed and timed-out sites sent nothing, so they leave a gap."""
    out: dict[str, dict[int, float | None]] = {}
    for r in detail["replies"]:
        if r["phase"] == phase and r["kind"] == "train" and r["fate"] not in ("failed", "timed out"):
            out.setdefault(r["site"], {})[r["round"]] = r[field]
    return out


def global_series(detail: dict, phase: str, keys: dict[str, str]) -> dict[str, dict[int, float | None]]:
    """{label: {round: value}} of the run's global metrics (`source:key`)."""
    metrics = detail["metrics"].get(phase, {})
    return {label: dict(map(tuple, metrics[key])) for label, key in keys.items() if key in metrics}


def tasks(detail: dict) -> list[str]:
    keys = detail["metrics"].get("finetune", {})
    return sorted(
        {
            k.split(":", 1)[1][: -len("-auc")]
            for k in keys
            if k.startswith("federated-eval:") and k.endswith("-auc")
        }
    )


def run_view(detail: dict) -> dict[str, Any]:
    """Charts, grid and stragglers of one run's page."""
    charts: list[Chart | None] = [
        chart(
            "probe",
            "Phase 1: masked-reconstruction loss",
            global_series(
                detail,
                "pretrain",
                {"probe (public images)": "server-probe:probe-loss", "train": "train:train-loss"},
            ),
            "loss",
        )
    ]
    for task in tasks(detail):
        keys = {m: f"federated-eval:{task}-{m}" for m in ("auc", "kappa", "accuracy")}
        central = {
            f"centralised {m}": detail["centralised"][m]
            for m in ("auc", "kappa")
            if m in detail["centralised"]
        }
        charts.append(
            chart(
                f"eval-{task}",
                f"Phase 2: {task} on the sites' validation images",
                global_series(detail, "finetune", keys) | central,
            )
        )
        loss = global_series(
            detail,
            "finetune",
            {"validation loss": f"federated-eval:{task}-loss", "train": "train:train-loss"},
        )
        charts.append(chart(f"loss-{task}", f"Phase 2: {task} loss", loss, "loss"))
    for phase in ("pretrain", "finetune"):
        charts += [
            chart(f"{cid}-{phase}", f"{phase}: {title}", per_site(detail, phase, field), unit)
            for cid, title, field, unit in PER_SITE
            if not (detail["secure"] and cid in HIDDEN_BY_SECURE_AGGREGATION)
        ]
        if detail["privacy_unit"]:
            unit = detail["privacy_unit"]
            charts.append(
                chart(
                    f"epsilon-{phase}",
                    f"{phase}: epsilon per site ({unit} level)",
                    per_site(detail, phase, "epsilon"),
                )
            )
    return {
        "charts": [c for c in charts if c is not None],
        "grid": participation(detail),
        "stragglers": stragglers(detail),
        "bytes_total": sum(r["bytes"] or 0 for r in detail["replies"]),
        "epsilon": latest_epsilon(detail),
        "hidden": [
            title for cid, title, *_ in PER_SITE if detail["secure"] and cid in HIDDEN_BY_SECURE_AGGREGATION
        ],
    }


def site_grid(detail: dict, cell: Callable[[str, tuple[str, int]], dict]) -> dict[str, Any]:
    """Sites x the run's rounds, `cell(site, (phase, round))` in each; columns labelled P1.., F1.."""
    columns = [(r["phase"], r["round"]) for r in detail["rounds"]]
    rows = [{"site": s, "cells": [cell(s, c) for c in columns]} for s in detail["sites"]]
    return {"columns": [f"{p[0].upper()}{n}" for p, n in columns], "rows": rows}


def train_replies(detail: dict) -> dict[tuple[str, str, int], dict]:
    """(site, phase, round) -> its train reply (the round's last attempt)."""
    return {(r["site"], r["phase"], r["round"]): r for r in detail["replies"] if r["kind"] == "train"}


def participation(detail: dict) -> dict[str, Any]:
    """Sites x rounds: each train reply's fate, the reason on hover ("" where a site was not sampled)."""
    replies = train_replies(detail)

    def cell(site: str, column: tuple[str, int]) -> dict:
        r = replies.get((site, *column))
        if r is None:
            return {"fate": "", "letter": "", "title": f"{site}: not sampled"}
        title = f"{site}, {column[0]} round {column[1]}: {r['fate']}" + (
            f": {r['reason']}" if r["reason"] else ""
        )
        return {"fate": r["fate"], "letter": FATE_LETTERS.get(r["fate"], "?"), "title": title}

    return site_grid(detail, cell)


def stragglers(detail: dict) -> dict[str, Any]:
    """Sites x rounds of train seconds, a cell flagged when over SLOW x its round's median."""
    replies = train_replies(detail)
    times: dict[tuple[str, int], list[float]] = {}
    for (_, phase, rnd), r in replies.items():
        if r["seconds"] is not None:
            times.setdefault((phase, rnd), []).append(r["seconds"])
    medians = {c: statistics.median(t) for c, t in times.items()}

    def cell(site: str, column: tuple[str, int]) -> dict:
        seconds = (replies.get((site, *column)) or {}).get("seconds")
        return {"seconds": seconds, "slow": seconds is not None and seconds > SLOW * medians[column]}

    return site_grid(detail, cell)


def latest_epsilon(detail: dict) -> dict[str, float | None]:
    """Each site's epsilon after its last private reply (None: the run is not private)."""
    out: dict[str, float | None] = {}
    for r in detail["replies"]:
        if r["kind"] == "train" and r["epsilon"] is not None:
            out[r["site"]] = r["epsilon"]
    return out


def compare_view(details: list[dict]) -> dict[str, Any]:
    """Two or more runs' global curves overlaid, one chart per metric they share."""

    def overlay(cid: str, title: str, phase: str, key: str) -> Chart | None:
        series = {}
        for d in details:
            values = d["metrics"].get(phase, {}).get(key)
            if values:
                series[d["name"]] = dict(map(tuple, values))
        return chart(cid, title, series)

    charts = [
        overlay("probe", "Phase 1: probe loss", "pretrain", "server-probe:probe-loss"),
        overlay("train-pretrain", "Phase 1: train loss", "pretrain", "train:train-loss"),
        overlay("train-finetune", "Phase 2: train loss", "finetune", "train:train-loss"),
    ]
    for task in sorted({t for d in details for t in tasks(d)}):
        for metric in ("auc", "kappa", "loss"):
            charts.append(
                overlay(
                    f"{task}-{metric}",
                    f"Phase 2: {task} {metric}",
                    "finetune",
                    f"federated-eval:{task}-{metric}",
                )
            )
    return {"charts": [c for c in charts if c is not None]}
