"""The environment every `flwr` command runs in (`simulation/flower_env.py`): a simulation starts its own Ray
instance unless it is told to join a cluster, whatever cluster a `ray start` on this machine left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from ray._private.services import canonicalize_bootstrap_address

from simulation.flower_env import flower_env


def test_a_simulation_starts_its_own_ray_instance_beside_a_ray_start_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray's own resolution of `ray.init()`'s address (what Flower's backend calls): the cluster file a
    `ray start` wrote is joined by a bare environment, not by ours; a given address is joined."""
    (tmp_path / "ray_current_cluster").write_text("10.0.0.9:6379")  # another user's, or a dead one
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert canonicalize_bootstrap_address(None, str(tmp_path)) == "10.0.0.9:6379"  # Ray alone would join it
    for key, value in flower_env(tmp_path / "home").items():
        monkeypatch.setenv(key, value)
    assert os.environ["RAY_ADDRESS"] == "local"
    assert canonicalize_bootstrap_address(None, str(tmp_path)) is None  # None: start a local instance
    monkeypatch.setenv("RAY_ADDRESS", flower_env(tmp_path / "home", "10.0.0.5:6379")["RAY_ADDRESS"])
    assert canonicalize_bootstrap_address(None, str(tmp_path)) == "10.0.0.5:6379"
