"""Running the real `flwr run .` from tests: an isolated FLWR_HOME (and so its own local SuperLink and
ports) per test module, started from the app's directory, stopped afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from simulation.flower_env import flower_env, flwr_run_command, override_string, stop_local_superlink
from simulation.replay import replay
from tests.conftest import ROOT


@dataclass(frozen=True)
class Flower:
    home: Path
    app: Path  # the app directory `flwr run .` starts from (the project root, or a test app)
    ray_address: str | None = None  # a running Ray cluster's head to run on (None: a fresh local instance)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **flower_env(self.home, self.ray_address)}

    def command(self, nodes: int, run_config: dict[str, object]) -> list[str]:
        return flwr_run_command(nodes, run_config)

    def run(
        self, nodes: int, run_config: dict[str, object], timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(nodes, run_config),
            cwd=self.app,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def run_and_kill(
        self, nodes: int, run_config: dict[str, object], when: Callable[[], bool], timeout: float = 600
    ) -> bool:
        """Start a run, SIGKILL its server process (flwr-simulation) once `when()` holds; True if killed."""
        process = subprocess.Popen(
            self.command(nodes, run_config),
            cwd=self.app,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        port = flower_env(self.home)["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
        deadline, killed = time.monotonic() + timeout, False
        try:
            while time.monotonic() < deadline and process.poll() is None:
                if when():
                    found = subprocess.run(
                        ["pkill", "-9", "-f", f"flwr-simulation --runtime-api-address 127.0.0.1:{port}"],
                        check=False,
                    )
                    killed = found.returncode == 0
                    break
                time.sleep(0.05)
        finally:
            os.killpg(
                process.pid, signal.SIGTERM
            )  # the `flwr run --stream` client, left streaming a dead run
            process.wait()
        return killed

    def stop(self) -> None:
        stop_local_superlink(flower_env(self.home))


def sets(**overrides: object) -> str:
    """The run config's `set` string from keyword overrides (dots as double underscores)."""
    return override_string({k.replace("__", "."): v for k, v in overrides.items()})


def store_rows(run_dir: Path, sql: str) -> list[tuple]:
    """Rows of `sql` from a run's store (`<run_dir>/federation/store.sqlite`)."""
    db = sqlite3.connect(run_dir / "federation" / "store.sqlite")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def assert_completed(result: subprocess.CompletedProcess[str], run_dir: Path, home: Path) -> None:
    """The run exited 0 and its store says completed. `flwr run --stream` exits 0 whatever became of the
    run, so a failure shows Flower's own account: the run's output and the local SuperLink's log."""
    status = store_rows(run_dir, "SELECT status FROM runs")
    if result.returncode == 0 and status == [("completed",)]:
        return
    link = home / "local-superlink"
    log = link / "superlink.log"
    superlink = log.read_text(errors="replace")[-4000:] if log.exists() else "(no superlink.log)"
    pytest.fail(
        f"the run ended {status} (flwr run exit {result.returncode}); Flower's tasks: {_tasks(link)}\n"
        f"--- flwr run output ---\n{result.stdout[-5000:]}\n{result.stderr[-3000:]}\n"
        f"--- superlink.log ---\n{superlink}"
    )


def _tasks(link: Path) -> list[tuple]:
    """The local SuperLink's own record of its tasks (type, outcome, details: e.g. a missed heartbeat)."""
    if not (link / "state.db").exists():
        return []
    db = sqlite3.connect(link / "state.db")
    try:
        return db.execute("SELECT type, sub_status, details, running_at, finished_at FROM task").fetchall()
    except sqlite3.Error as exc:
        return [("unreadable", str(exc))]
    finally:
        db.close()


def app_with_client(tmp_path: Path, client: str) -> Path:
    """A copy of this app whose clientapp is `tests/integration/<client>.py` (its server is ours, unchanged):
    sites that misbehave on purpose, for the tests that need them."""
    app = tmp_path / f"{client}-app"
    for package in ("server", "client", "shared", "simulation"):
        shutil.copytree(ROOT / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "tests" / "integration" / f"{client}.py", app / f"{client}.py")
    ours = (ROOT / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(ours.replace('"client.app:app"', f'"{client}:app"'))
    (app / "README.md").write_text(f"{client}: sites for a test\n")
    return app


def iid_scenario(tmp_path: Path, source: Path, parts: int) -> Path:
    """A scenario splitting `source` into `parts` IID virtual sites."""
    plan = tmp_path / f"iid{parts}.yaml"
    split = {"kind": "iid", "source": str(source), "parts": parts}
    plan.write_text(yaml.safe_dump({"name": f"iid{parts}", "split": split}))
    return plan


# The replay computes the same floats only with the same thread count; one fine-tuning round.
REPLAYED = {
    "threads": 1,
    "federation__min_sites": 1,
    "federation__rounds_finetune": 1,
    "federation__max_update_norm": 1e5,
}


def faulty_run(
    tmp_path: Path, factory: pytest.TempPathFactory, plan: Path, name: str, **settings: object
) -> subprocess.CompletedProcess:
    """One tiny-profile run of `plan` (IID parts) whose sites are `faulty_client`'s, in `tmp_path/runs`."""
    nodes = yaml.safe_load(plan.read_text())["split"]["parts"]
    fl = Flower(factory.mktemp(f"flwr-home-{name}"), app_with_client(tmp_path, "faulty_client"))
    config = {"profile": "tiny", "scenario": str(plan), "run-name": name}
    try:
        return fl.run(nodes, config | {"set": sets(runs_dir=tmp_path / "runs", **settings)})
    finally:
        fl.stop()


def assert_replays_exactly(run: Path) -> None:
    """The store is an exact account: replaying the replies it marks as aggregated gives the run's weights."""
    replayed_phases = replay(run / "federation")
    assert set(replayed_phases) == {"pretrain", "finetune"}
    for phase, (replayed, final) in replayed_phases.items():
        assert replayed.keys() == final.keys() and all(
            np.array_equal(replayed[k], final[k]) for k in final
        ), phase
