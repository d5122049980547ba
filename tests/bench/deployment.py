"""Deployment against simulation for the same tiny run: two sites (EyePACS-like, MMAC-like), 2 + 2 rounds,
once through `fedretina server start` + two `fedretina site serve` daemons (TLS, node authentication, the
Fleet-only proxy) and once through `flwr run .` (Ray). Reports each phase's median round time both ways and
their ratio, measured in one run, and the HTTP requests the sites made through the proxy per round. Where
deployment's time goes (Flower 1.41): each message starts a fresh `flwr-clientapp` process (Python, torch
and the app imported again), SuperNode and ServerApp poll every 3 s, and every object of a message is its
own request (weights travel packed in one buffer for that reason: `shared/federation/wire.py:pack`).
"""

from __future__ import annotations

import shutil
import sqlite3
import statistics
from pathlib import Path

import yaml

from tests.conftest import ROOT, write_site
from tests.integration.deployment import deployed, ok
from tests.integration.flower import Flower, sets

ROUNDS = {"rounds_pretrain": 2, "rounds_finetune": 2, "min_sites": 2, "connect_deadline_s": 300}


def run(out: Path) -> dict:
    out = out.resolve()  # the scenario's site paths are read relative to its own file
    shutil.rmtree(out, ignore_errors=True)
    sites = {"eyepacs": write_site(out, "eyepacs", 10), "mmac": write_site(out, "mmac", 20)}
    with deployed(out / "deployment", sites) as federation:
        ok(federation.run("bench", **ROUNDS))
        deployment = _medians(federation.store("bench", "SELECT phase, finished - started FROM rounds"))
        requests = (federation.state / "logs" / "nginx-access.log").read_text().count("POST /v1/fleet/")
    scenario = out / "two.yaml"
    scenario.write_text(yaml.safe_dump({"name": "two", "sites": [str(p) for p in sites.values()]}))
    flower = Flower(out / "flwr-home", ROOT)
    try:
        overrides = sets(runs_dir=out / "runs", **{f"federation__{k}": v for k, v in ROUNDS.items()})
        done = flower.run(
            2, {"profile": "tiny", "scenario": str(scenario), "run-name": "sim", "set": overrides}
        )
    finally:
        flower.stop()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    db = sqlite3.connect(out / "runs" / "sim" / "federation" / "store.sqlite")
    simulation = _medians(db.execute("SELECT phase, finished - started FROM rounds").fetchall())
    db.close()
    result: dict = {
        "fleet_requests_per_round": requests / sum(ROUNDS[k] for k in ("rounds_pretrain", "rounds_finetune"))
    }
    for phase in ("pretrain", "finetune"):
        result[f"{phase}_round_s_deployment"] = deployment[phase]
        result[f"{phase}_round_s_simulation"] = simulation[phase]
        result[f"{phase}_round_deployment_over_simulation"] = deployment[phase] / simulation[phase]
    return {k: round(v, 3) for k, v in result.items()}


def _medians(rows: list[tuple]) -> dict[str, float]:
    by_phase: dict[str, list[float]] = {}
    for phase, seconds in rows:
        by_phase.setdefault(phase, []).append(seconds)
    return {phase: statistics.median(values) for phase, values in by_phase.items()}
