"""Scale: the server's peak memory and round time at 10, 50 and 100 simulated sites (real `flwr run .`).

Every site replies every round with the cpu profile's whole pretraining model (7.9 MB): a server that held
every reply before averaging would grow by that much per site; ours folds each reply into running sums as
it lands (server/replies.py). Sites hold one patient (two images) and train one local step, so the figures
are the orchestration's, not training's. Peak RSS is the server process's own (`server/peak-rss-mb`, after
each round); round time is the median of the rounds after the first (which starts Ray and fills caches).
"""

from __future__ import annotations

import shutil
import sqlite3
import statistics
import subprocess
from pathlib import Path

import yaml

from shared.data.synth.layouts import render_jobs, write_eyepacs
from tests.conftest import ROOT, site_yaml
from tests.integration.flower import Flower, sets

SITES = (10, 50, 100)
ROUNDS = 2


def run(out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    render_jobs(write_eyepacs(out / "eyepacs", max(SITES), 0, 96, ("topcon",)), workers=2)
    source = site_yaml(out, "eyepacs", out / "eyepacs").resolve()
    result: dict = {}
    for n in SITES:
        try:
            rss, seconds = _federation(out, source, n)
        except (RuntimeError, subprocess.TimeoutExpired) as error:  # keep the figures measured so far
            result[f"failed_at_{n}_sites"] = str(error).splitlines()[0]
            break
        result[f"server_peak_rss_mb_{n}_sites"] = rss
        result[f"round_s_{n}_sites"] = seconds
    for n in [n for n in SITES[1:] if f"server_peak_rss_mb_{n}_sites" in result]:
        result[f"server_peak_rss_{n}_over_{SITES[0]}_sites"] = (
            result[f"server_peak_rss_mb_{n}_sites"] / result[f"server_peak_rss_mb_{SITES[0]}_sites"]
        )
        result[f"server_peak_rss_{n}_over_{SITES[0]}_sites_target"] = "<= 1.10"
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def _federation(out: Path, source: Path, sites: int) -> tuple[float, float]:
    """(peak server RSS in MB over the run, median seconds of the rounds after the first)."""
    scenario = out / f"iid{sites}.yaml"
    split = {"kind": "iid", "source": str(source), "parts": sites}
    scenario.write_text(yaml.safe_dump({"name": scenario.stem, "split": split}))
    flower = Flower(out / f"flwr-home-{sites}", ROOT)
    try:
        done = flower.run(
            sites,
            {
                "profile": "cpu",
                "scenario": str(scenario),
                "run-name": scenario.stem,
                "set": sets(
                    runs_dir=out / "runs",
                    federation__rounds_pretrain=ROUNDS,
                    federation__rounds_finetune=0,
                    federation__min_sites=sites,
                    federation__local_steps=1,
                    pretrain__batch_size=2,
                    data__image_size=64,
                ),
            },
            timeout=3600,
        )
    finally:
        flower.stop()
    store = out / "runs" / scenario.stem / "federation" / "store.sqlite"
    db = sqlite3.connect(store) if store.is_file() else None
    try:
        status = db.execute("SELECT status FROM runs").fetchone() if db else None
        if done.returncode != 0 or status != ("completed",):
            tail = f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            raise RuntimeError(f"{sites} sites: flwr run failed\n{tail}")
        rss = db.execute("SELECT MAX(value) FROM metrics WHERE source = 'server' AND key = 'peak-rss-mb'")
        rounds = db.execute("SELECT finished - started FROM rounds ORDER BY round").fetchall()
        return float(rss.fetchone()[0]), statistics.median(r[0] for r in rounds[1:])
    finally:
        if db is not None:
            db.close()
