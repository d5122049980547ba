"""A simulation on a two-node Ray cluster: a head and a worker started with `ray start` on this machine, as
on two hosts sharing the checkout's paths (docs/scale.md). The head offers no CPU, so every ClientApp has to
run on the worker node: the run completing shows the actors ran off the head. One of the two sites points
at data the worker does not have: the site's log (streamed by Ray to the run's output) names the Ray node and
the path, the server records only the error's class, and the run goes on with the other site."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from simulation.flower_env import VENV_BIN
from tests.conftest import ROOT
from tests.integration.flower import Flower, assert_completed, sets, store_rows
from tests.integration.web import free_port

pytestmark = pytest.mark.integration


def _ray_start(*args: str) -> int:
    """`ray start ARGS` leading a process group of its own, which its daemons join: the group's id."""
    process = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    if process.wait(timeout=180) != 0:
        raise RuntimeError(f"ray start {' '.join(args)} failed")
    return process.pid


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A head (no CPUs) and a worker node (2 CPUs) on this machine, in a temp dir of their own, so their
    `ray_current_cluster` is not the machine's; stopped by their own process groups only (`ray stop` would
    end every Ray process here, the other tests' simulations included)."""
    address = f"127.0.0.1:{free_port()}"
    port = address.rsplit(":", 1)[1]
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live below it
    own, groups = f"--temp-dir={temp}", []
    try:
        head = ("--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false")
        groups.append(_ray_start(*head, own))
        groups.append(_ray_start(f"--address={address}", "--num-cpus=2", own))
        yield address
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for group in groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, sig)
            time.sleep(2)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_simulation_runs_on_the_worker_node_and_names_the_node_missing_a_site(
    ray_cluster: str, tiny_sites: dict[str, Path], tmp_path: Path
) -> None:
    missing, absent = tmp_path / "lost.yaml", tmp_path / "absent"
    missing.write_text(yaml.safe_dump({"name": "lost", "format": "eyepacs", "root": str(absent)}))
    plan = tmp_path / "two.yaml"
    plan.write_text(yaml.safe_dump({"name": "two", "sites": [str(tiny_sites["eyepacs"]), str(missing)]}))
    # the environment `eval "$(fedretina env --ray-address ...)"` exports
    flower = Flower(tmp_path / "flwr-home", ROOT, ray_address=ray_cluster)
    runs = tmp_path / "runs"
    try:
        result = flower.run(
            2,
            {
                "profile": "tiny",
                "scenario": str(plan),
                "run-name": "ray",
                "set": sets(runs_dir=runs, federation__min_sites=1, federation__rounds_finetune=0),
            },
        )
    finally:
        flower.stop()
    assert_completed(result, runs / "ray", flower.home)
    sites = store_rows(runs / "ray", "SELECT site FROM sites")
    errors = [m for (m,) in store_rows(runs / "ray", "SELECT message FROM events WHERE kind = 'site-error'")]
    assert sites == [("eyepacs",)]
    assert len(errors) == 1 and "ConfigError at this site" in errors[0]  # the details stay at the site
    site_log = result.stdout + result.stderr  # Ray streams the actors' logs to the run's output
    assert f"on Ray node {socket.gethostname()}: {missing}: root: {absent} is not a directory" in site_log
    assert "at the same paths as the head node" in site_log
