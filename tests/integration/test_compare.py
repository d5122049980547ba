"""`fedretina compare` end to end at the tiny profile, its federated arms real `flwr run .` simulations.

One comparison over two scenarios: one site holding everything (where a federation must equal the pooled run
bitwise, so federated minus centralised is exactly zero) and that site split IID in two. It is interrupted
(SIGTERM) while its first federated arm runs, run again (which must finish it without redoing the arms done
before), and run a third time under another name (which must reuse every arm).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from server.store import StoreReader
from shared.config import load_config
from shared.data.manifest import labelled
from shared.data.scenario import load_scenario, scenario_sites
from shared.data.site import load_site
from shared.training.data import site_images
from shared.training.finetune import build_task_model, predict_logits, site_test_rows
from shared.weights import load_weights
from simulation.compare.report import METRICS, NAMES, mean_ci
from tests.conftest import FEDRETINA, ROOT, write_site
from tests.integration.web import dashboard, screenshot

pytestmark = pytest.mark.integration


def _compare(config: Path, name: str) -> list[str]:
    return [FEDRETINA, "compare", "-c", str(config), "--name", name]


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("compare")
    site = write_site(root, "eyepacs", 40, seed=3, styles=("eyepacs-mixed-a", "eyepacs-mixed-b"))
    single = root / "single.yaml"
    single.write_text(yaml.safe_dump({"name": "single", "sites": [str(site)]}))
    iid = root / "iid2.yaml"
    iid.write_text(
        yaml.safe_dump({"name": "iid2", "split": {"kind": "iid", "source": str(site), "parts": 2}})
    )
    # more held-out patients of the same population, scored by every arm (compare.test_sites)
    rendered = write_site(root / "held-out", "eyepacs", 12, seed=5, test_fraction=1.0, first_id=100_000)
    held_out = root / "held-out.yaml"
    spec = yaml.safe_load(rendered.read_text()) | {"name": "held-out", "options": {"labels": None}}
    held_out.write_text(yaml.safe_dump(spec))
    config = root / "compare.yaml"
    settings = {
        "profile": "tiny",
        "threads": 1,  # the federation's actors train on one thread: the same floats need the same sums
        "runs_dir": str(root / "runs"),
        "finetune": {"task": "dr", "bootstrap": 100},
        "federation": {"rounds_pretrain": 1, "rounds_finetune": 2, "min_sites": 1},
        "compare": {
            "pretrain": True,
            "seeds": [0],
            "strategies": {
                "fedavg": {"federation.strategy": "fedavg"},
                "fedbn": {"federation.strategy": "fedbn"},
            },
            "scenarios": {str(single): ["fedavg"], str(iid): []},
            "test_sites": [str(held_out)],
        },
    }
    config.write_text(yaml.safe_dump(settings, sort_keys=False))  # the scenarios in this order
    arms = root / "runs" / "arms"

    # stopped (SIGTERM, as a scheduler or systemd would; Ctrl-C takes the same path) once the first federated
    # arm has checkpointed its pretraining round
    console = root / "interrupted.log"
    with console.open("w") as out:
        process = subprocess.Popen(_compare(config, "first"), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if list(arms.glob("federated-*/federation/checkpoints/*.safetensors")):
                os.kill(process.pid, signal.SIGTERM)
                break
            time.sleep(0.2)
        process.wait(timeout=120)
    reported = (root / "runs" / "first" / "compare" / "report.md").exists()
    before = {p.parent.name: p.stat().st_mtime_ns for p in arms.glob("*/arm.json")}

    resumed = subprocess.run(_compare(config, "first"), cwd=ROOT, capture_output=True, text=True, check=False)
    after = {p.parent.name: p.stat().st_mtime_ns for p in arms.glob("*/arm.json")}
    again = subprocess.run(_compare(config, "again"), cwd=ROOT, capture_output=True, text=True, check=False)
    return {
        "root": root,
        "interrupted": (process.returncode, reported, console.read_text()),
        "resumed": resumed,
        "again": again,
        "before": before,
        "after": after,
        "final": {p.parent.name: p.stat().st_mtime_ns for p in arms.glob("*/arm.json")},
        "out": root / "runs" / "first" / "compare",
    }


def _folders(compared: dict) -> dict[tuple[str, str], Path]:
    """(scenario stem, arm label) -> the arm's folder, from the comparison's arms.json."""
    arms = json.loads((compared["out"] / "arms.json").read_text())
    return {(Path(a["scenario"]).stem, a["label"]): Path(a["folder"]) for a in arms}


def test_an_interrupted_comparison_resumes_without_redoing_finished_arms(compared: dict) -> None:
    code, reported, console = compared["interrupted"]
    assert code == 130 and not reported, console[-2000:]
    assert "compare: interrupted; run the same command again to continue" in console
    before, after = compared["before"], compared["after"]
    # the first scenario's centralised and local arms had finished; its federated arm was running
    assert sorted(k.split("-")[0] for k in before) == ["centralised", "local"], sorted(before)
    resumed = compared["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {k: after[k] for k in before} == before, "a finished arm was trained again"
    assert len(after) == 8  # per scenario: centralised, each site alone, fedavg (and fedbn on iid2)
    assert resumed.stderr.count("reusing") == len(before)
    log = (_folders(compared)[("single", "fedavg")] / "flwr-run.log").read_text()
    assert "resuming after" in log  # the interrupted simulation continued from its last checkpoint


def test_an_arm_of_identical_settings_is_not_recomputed(compared: dict) -> None:
    again = compared["again"]
    assert again.returncode == 0, again.stderr[-3000:]
    assert compared["final"] == compared["after"], "another comparison of the same arms trained one again"
    assert again.stderr.count("reusing") == 8
    first = pd.read_csv(compared["out"] / "results.csv")
    second = pd.read_csv(compared["root"] / "runs" / "again" / "compare" / "results.csv")
    pd.testing.assert_frame_equal(first, second)


def test_identical_arms_pair_to_an_interval_of_zero_width_at_zero(compared: dict) -> None:
    """One site holding everything: the federation (interrupted and resumed, too) equals the pooled run
    bitwise, so every difference and both ends of its interval are exactly 0."""
    folders = _folders(compared)
    with (
        np.load(folders[("single", "centralised")] / "test.npz") as c,
        np.load(folders[("single", "fedavg")] / "test.npz") as f,
    ):
        assert np.array_equal(c["probs"], f["probs"]) and np.array_equal(c["y"], f["y"])
    diffs = pd.read_csv(compared["out"] / "differences.csv")
    fed = diffs[diffs["scenario"].str.endswith("single.yaml") & (diffs["arm"] == "fedavg")].iloc[0]
    for key in METRICS:
        assert fed[key] == fed[f"{key}_low"] == fed[f"{key}_high"] == 0.0, key
    assert fed["verdict"] == "non-inferior"
    split = diffs[diffs["scenario"].str.endswith("iid2.yaml") & (diffs["arm"] == "fedavg")].iloc[0]
    assert split["referable_auc_low"] < split["referable_auc_high"]  # different models: a real interval


def test_a_fedbn_arm_scores_each_sites_test_images_with_that_sites_own_batchnorm(compared: dict) -> None:
    """FedBN's exported model carries the server's average BatchNorm; each site predicts with its own, kept
    in the site's state folder, and that is what the arm is scored with."""
    arm = _folders(compared)[("iid2", "fedbn")]
    uid = StoreReader(arm / "federation" / "store.sqlite").run()["run_uid"]  # type: ignore[index]
    kept = sorted((compared["root"] / "state").glob(f"**/{uid}/finetune-bn-r0002.safetensors"))
    own = {path.parents[1].name: load_weights(path)[0] for path in kept}  # <site>/<uid>/file
    cfg = load_config(arm / "experiment.yaml")
    exported, _ = load_weights(arm / "federation" / "model.safetensors")
    with np.load(arm / "test.npz") as saved:
        scored = {k: saved[k] for k in saved.files}
    sites = scenario_sites(load_scenario(str(compared["root"] / "iid2.yaml")), 0)
    assert sorted(own) == sorted(s.name for s in sites)
    model = build_task_model(cfg, {"dr": 5})
    for site in sites:
        rows = labelled(site.rows, "dr")
        rows = rows[rows["split"] == "test"]
        data = site_images(site, cfg, cfg.finetune_image_size, "none", rows=rows, task="dr")
        mine = scored["site"] == site.name
        assert mine.sum() == len(rows) > 0
        logits = {}
        for name, weights in (("own", {**exported, **own[site.name]}), ("average", exported)):
            model.load_state_dict(weights)
            logits[name] = predict_logits(model, data, "dr", torch.device("cpu"))[1]
        order = np.argsort(rows["image_id"].to_numpy(dtype=str), kind="stable")
        # equal up to the summation order of another thread count; the server's average is far off
        assert np.abs(scored["logits"][mine] - logits["own"][order]).max() < 1e-6
        assert np.abs(logits["own"] - logits["average"]).max() > 1e-4


def test_every_arm_is_also_scored_on_the_held_out_sites_test_images(compared: dict) -> None:
    held_out = site_test_rows(load_site(compared["root"] / "held-out.yaml"), "dr")
    sizes = set()
    for folder in _folders(compared).values():
        with np.load(folder / "test.npz") as saved:
            mine = saved["site"] == "held-out"
            assert sorted(saved["image_id"][mine]) == sorted(held_out["image_id"]) and len(held_out) > 0
            assert np.array_equal(saved["y"][mine][np.argsort(saved["image_id"][mine])], held_out["label_dr"])
            sizes.add(len(saved["y"]))
    report = (compared["out"] / "report.md").read_text()
    assert "test images and the held-out test site(s) held-out, pooled" in report
    assert all(f"Scored on {n} test images" in report for n in sizes)


def test_the_reports_numbers_equal_those_recomputed_from_results_csv(compared: dict) -> None:
    out = compared["out"]
    results = pd.read_csv(out / "results.csv")
    assert list(results.columns) == ["arm", "kind", "scenario", "seed", "site", "metric", "value"]
    report = (out / "report.md").read_text()
    tables = _tables(report)
    checked = 0
    for (scenario, arm), g in results[results["site"] == "all"].groupby(["scenario", "arm"]):
        row = tables[_name(scenario)]["main"][arm]
        for key in METRICS:
            mean, _, _ = mean_ci(g.loc[g["metric"] == key, "value"])
            assert row[NAMES[key]] == f"{mean:.3f}", (scenario, arm, key)
            checked += 1
    for (scenario, arm), g in results[results["site"] != "all"].groupby(["scenario", "arm"]):
        row = tables[_name(scenario)]["sites"][arm]
        for site, value in g[g["metric"] == "referable_auc"].groupby("site")["value"].mean().items():
            assert row[site] == ("-" if np.isnan(value) else f"{value:.3f}")
            checked += 1
    assert checked >= 7 * 3
    # the cost table says what each arm trained: the equal compute, phase by phase
    assert "| centralised | 1 pretraining + 2 fine-tuning epochs |" in report
    assert "| fedavg | pretrain 1 x 1 local epoch, finetune 2 x 1 local epoch |" in report
    assert (out / "report.html").read_text().count("<table>") == report.count("\n|---|")
    assert sorted(p.name for p in out.glob("curves_*.png")) == ["curves_iid2.png", "curves_single.png"]


def _name(scenario: str) -> str:
    return Path(scenario).stem


def _tables(report: str) -> dict[str, dict[str, dict[str, dict[str, str]]]]:
    """Per scenario heading: its main table and its per-site table, each as arm -> column -> cell."""
    found: dict[str, dict[str, dict[str, dict[str, str]]]] = {}
    for section in re.split(r"^## ", report, flags=re.M)[1:]:
        name = section.splitlines()[0].strip()
        tables = [t for t in re.split(r"\n\n", section) if t.startswith("| ")]
        parsed = []
        for table in tables:
            lines = table.strip().splitlines()
            header = [c.strip() for c in lines[0].strip("|").split("|")]
            rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
            parsed.append({r[0]: dict(zip(header, r, strict=True)) for r in rows})
        if name != "Software and seeds":
            found[name] = {"main": parsed[0], "sites": parsed[2]}
    return found


def test_the_dashboard_overlays_the_centralised_curve_on_a_federated_arms_run(
    compared: dict, browser: object
) -> None:
    folders = _folders(compared)
    fed, central = folders[("iid2", "fedavg")], folders[("iid2", "centralised")]
    history = pd.read_csv(next((central / "finetune" / "history").glob("*.csv")))
    page = browser.new_page(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
    with dashboard(fed.parent) as base:
        page.goto(f"{base}/run/{fed.name}")
        page.wait_for_selector("#chart-eval-dr .uplot")
        spec = json.loads(page.locator("#chart-eval-dr script.spec").text_content())
        shown = {s["label"]: s["values"] for s in spec["series"]}
        assert spec["x"] == [1, 2]
        assert shown["centralised auc"] == pytest.approx(history["auc"].tolist())  # epoch r on round r
        assert shown["auc"] and shown["kappa"]
        screenshot(page, "centralised-overlay")
