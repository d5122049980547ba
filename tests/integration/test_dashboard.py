"""The dashboard in a real browser (Debian's chromium driven by Playwright), served by the real CLI over run
stores written by the ServerApp's own writers: the numbers shown are the store's, the participation grid
marks a rejected reply with its reason, a page left open on a running run shows a new round without a
reload while the run keeps writing unblocked, no request leaves for another host, and the token rules hold.

Set FEDRETINA_SCREENSHOTS=<folder> to keep a screenshot of each page (docs/img holds the committed ones)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import FEDRETINA
from tests.integration.dashboard_store import REFUSED, REJECTED, record_final_test, record_round, start
from tests.integration.web import dashboard, screenshot

pytestmark = pytest.mark.integration


def rows(store: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_pages_show_the_stores_numbers_and_every_replys_fate(browser: object, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for name, pace in (("alpha", 1.0), ("beta", 2.0)):
        store = start(runs, name, sites=5, rounds=4)
        for rnd in (1, 2, 3, 4):
            record_round(store, rnd, sites=5, pace=pace)
        record_final_test(store, 4, {0: (30, 0.9), 4: (10, 0.7)})
        record_final_test(store, 4, {0: (30, 0.8), 4: (10, 0.6)}, kind="cross:site-04")
        store.finish_run("completed")
    db = runs / "alpha" / "federation" / "store.sqlite"
    page = browser.new_page(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    with dashboard(runs) as base:
        page.goto(base + "/")
        assert page.locator("#runs tbody tr").count() == 2
        assert "completed" in page.locator("#runs tbody tr", has_text="alpha").inner_text()
        assert page.request.get(base + "/runs.csv").text().count("\n") == 3  # header and two runs
        screenshot(page, "runs")

        page.goto(base + "/run/alpha")
        page.wait_for_selector("figure.chart .uplot")
        grid = page.locator("#participation")
        rejected = grid.locator("tr", has_text="site-01").locator("td").first
        assert "fate-rejected" in rejected.get_attribute("class")
        assert REJECTED in rejected.get_attribute("title")
        refused = grid.locator("tr", has_text="site-02").locator("td").first
        assert "fate-refused" in refused.get_attribute("class") and REFUSED in refused.get_attribute("title")
        assert (rejected.inner_text(), refused.inner_text()) == ("R", "S")  # one letter per fate
        failed = grid.locator("tr", has_text="site-03").locator("td").nth(1)  # round 2
        assert "fate-failed" in failed.get_attribute("class") and "NODE_UNAVAILABLE" in failed.get_attribute(
            "title"
        )
        # the epsilon shown per site is its last reply's, as stored
        stored = {
            site: json.loads(m)["privacy-epsilon"]
            for site, m in rows(db, "SELECT site, metrics FROM replies WHERE round = 4 AND kind = 'train'")
            if m != "{}"
        }
        shown = dict(
            (r.locator("td").first.inner_text(), float(r.locator("td").nth(1).inner_text()))
            for r in page.locator("#epsilon tbody tr").all()
        )
        assert shown.keys() >= stored.keys() and all(abs(shown[s] - v) < 5e-4 for s, v in stored.items())
        # a chart's data are the store's, round by round
        spec = json.loads(page.locator("#chart-probe script.spec").text_content())
        probe = rows(db, "SELECT round, value FROM metrics WHERE key = 'probe-loss' ORDER BY round")
        assert spec["x"] == [r for r, _ in probe] and spec["series"][0]["values"] == [v for _, v in probe]
        slow = page.locator("#stragglers tr", has_text="site-04").locator("td.slow")
        assert slow.count() >= 3  # site 4 took 30 s more than the others every round it replied
        quick = page.locator("#stragglers tr", has_text="site-00").locator("td").first
        assert quick.inner_text() == "0.4"  # a sub-second round is not shown as 0
        rows_shown = page.locator("#final-test tbody tr").all()
        final = [[c.inner_text() for c in r.locator("td").all()] for r in rows_shown]
        assert [r[:4] for r in final] == [
            ["site-00", "dr", "30", "0.900"],
            ["site-04", "dr", "10", "0.700"],
            ["image-weighted mean", "dr", "40", "0.850"],  # (30 x 0.9 + 10 x 0.7) / 40
        ]
        cross = page.locator("#cross-site-dr tbody tr").all()
        assert [[c.inner_text() for c in r.locator("th, td").all()] for r in cross] == [
            ["federated", "0.900", "0.700"],  # the final model, as each site scored it
            ["trained at site-04", "0.800", "0.600"],  # site-04's own model, scored by each site
        ]
        assert page.request.get(base + "/run/nope").status == 404
        assert page.request.get(base + "/run/alpha/probes/..%2F..%2Fstore.sqlite").status == 404
        csv = page.request.get(base + "/run/alpha/replies.csv").text()
        assert csv.count("\n") == 1 + len(rows(db, "SELECT * FROM replies"))
        screenshot(page, "run")

        page.goto(base + "/compare?run=alpha&run=beta")
        page.wait_for_selector("figure.chart .uplot")
        spec = json.loads(page.locator("#chart-probe script.spec").text_content())
        assert [s["label"] for s in spec["series"]] == ["alpha", "beta"]
        screenshot(page, "compare")
    assert requests and all(u.startswith(base) for u in requests), [
        u for u in requests if not u.startswith(base)
    ]


def test_a_page_on_a_running_run_shows_new_rounds_without_reload(browser: object, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    store = start(runs, "live", sites=4, rounds=6)
    record_round(store, 1, sites=4)
    page = browser.new_page()  # type: ignore[attr-defined]
    with dashboard(runs) as base:
        page.goto(base + "/run/live")
        assert page.locator("#progress-pretrain").inner_text() == "1/6"
        page.evaluate("window.sameDocument = true")
        written: list[float] = []

        def run_goes_on() -> None:  # the run writing while the page polls its store
            for rnd in (2, 3):
                time.sleep(1.0)
                t = time.perf_counter()
                record_round(store, rnd, sites=4)
                written.append(time.perf_counter() - t)
            store.finish_run("failed")
            store.event("error", "FederationError: pretrain round 4: fewer than 2 accepted updates", "error")

        writer = threading.Thread(target=run_goes_on)
        writer.start()
        page.wait_for_function(
            "document.getElementById('progress-pretrain').textContent === '3/6'", timeout=30000
        )
        writer.join()
        page.wait_for_function(
            "document.getElementById('run-status').textContent === 'failed'", timeout=30000
        )
        assert page.evaluate("window.sameDocument") is True  # updated in place, never reloaded
        assert len(written) == 2  # every write went through while the dashboard read
        page.goto(base + "/")
        assert "fewer than 2 accepted updates" in page.locator("#runs tbody tr").first.inner_text()


def test_a_run_in_a_subfolder_opens_by_its_path_and_names_its_scenario(
    browser: object, tmp_path: Path
) -> None:
    """compare's arms live in runs/arms/<kind>-<digest>/: the runs table links them by that path, and the
    run page, its CSV tables and its JSON answer there; a scenario given as a YAML path is named by its stem
    (the path on hover)."""
    runs = tmp_path / "runs"
    scenario = "/data/studies/camera-skew.yaml"
    store = start(runs / "arms", "federated-3f9a", sites=3, rounds=2, scenario=scenario)
    for rnd in (1, 2):
        record_round(store, rnd, sites=3)
    store.finish_run("completed")
    page = browser.new_page(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
    with dashboard(runs) as base:
        page.goto(base + "/")
        page.locator("#runs a", has_text="arms/federated-3f9a").click()
        page.wait_for_selector("figure.chart .uplot")
        assert page.url == base + "/run/arms/federated-3f9a"
        meta = page.locator("p.meta span").first
        assert meta.inner_text() == "camera-skew" and meta.get_attribute("title").endswith("camera-skew.yaml")
        for path in ("/run/arms/federated-3f9a/replies.csv", "/api/run/arms/federated-3f9a"):
            assert page.request.get(base + path).status == 200, path
        assert page.request.get(base + "/run/arms/federated-3f9a/nope.csv").status == 404
        assert page.request.get(base + "/run/arms").status == 404
        screenshot(page, "run-in-a-subfolder")


def test_a_100_round_10_site_run_page_renders_completely(browser: object, tmp_path: Path) -> None:
    """The time to the first complete render is printed (a figure for the notes, never asserted)."""
    runs = tmp_path / "runs"
    store = start(runs, "big", sites=10, rounds=100)
    for rnd in range(1, 101):
        record_round(store, rnd, sites=10)
    store.finish_run("completed")
    page = browser.new_page(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
    with dashboard(runs) as base:
        started = time.perf_counter()
        page.goto(base + "/run/big")
        charts = page.locator("figure.chart").count()
        page.wait_for_function(f"document.querySelectorAll('figure.chart .uplot').length === {charts}")
        seconds = time.perf_counter() - started
    assert page.locator("#participation tbody tr").count() == 10
    assert page.locator("#participation thead th").count() == 101
    print(f"\n100-round 10-site run page: complete render in {seconds:.2f} s ({charts} charts)")


def test_the_token_rules(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    start(runs, "r", sites=2, rounds=1).finish_run("completed")
    refused = subprocess.run(
        [FEDRETINA, "dashboard", str(runs), "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith(
        "fedretina: error: --host 0.0.0.0: serving beyond this machine needs a token"
    )
    with dashboard(runs, "--token", "s3cret-token") as base:
        for url in (base + "/", base + "/run/r", base + "/?token=wrong"):
            with pytest.raises(urllib.error.HTTPError) as denied:
                urllib.request.urlopen(url, timeout=10)
            assert denied.value.code == 401
        with urllib.request.urlopen(base + "/run/r?token=s3cret-token", timeout=10) as ok:
            assert ok.status == 200 and "Participation" in ok.read().decode()
        bearer = urllib.request.Request(base + "/api/runs", headers={"Authorization": "Bearer s3cret-token"})
        with urllib.request.urlopen(bearer, timeout=10) as ok:
            assert json.loads(ok.read())[0]["name"] == "r"
