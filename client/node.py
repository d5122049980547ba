"""Which site this node is: a site YAML named in the node config (deployment), or the scenario's site for
this partition id (simulation, where Flower gives a node nothing but its partition id).

A node resolves its site once per process: splitting a scenario's source (a k-means for `camera`) is not
repeated for every message. The cache is keyed by the scenario, seed and partition (or the site YAML), so
virtual sites sharing a process never see each other's data. Its lifetime is Flower's: a simulation's Ray
actors live for one run, and a SuperNode starts a ClientApp process per message, so a `site check` run
between runs is always seen.
"""

from __future__ import annotations

import functools
import socket
import sys
from collections.abc import Mapping
from typing import Any

from shared.data.scenario import load_scenario, scenario_sites
from shared.data.site import Site, load_site
from shared.errors import ConfigError, UserError
from shared.federation.wire import RunSpec

SITE_KEY = "site-config"
PARTITION_KEY = "partition-id"


def node_site(node_config: Mapping[str, Any], run: RunSpec) -> Site:
    try:
        return _node_site(node_config, run)
    except UserError as exc:
        if not _in_ray_worker():
            raise
        raise type(exc)(
            f"on Ray node {socket.gethostname()}: {exc} (every node of the cluster needs this checkout and "
            "the sites' data at the same paths as the head node)"
        ) from exc


def _in_ray_worker() -> bool:
    """True inside a simulation's Ray actor, which may run on another machine than the `flwr run`."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _node_site(node_config: Mapping[str, Any], run: RunSpec) -> Site:
    if SITE_KEY in node_config:
        if run.scenario:  # a site served from its YAML reads that site, never one the server names
            raise ConfigError(
                f"the server asks this node to play scenario {run.scenario!r}; it serves its site YAML only"
            )
        return _site_from_yaml(str(node_config[SITE_KEY]))
    if not run.scenario:
        raise ConfigError(
            f"this node has no `{SITE_KEY}` in its node config and the run names no scenario; start the "
            f"SuperNode with --node-config '{SITE_KEY}=\"/path/to/site.yaml\"'"
        )
    if PARTITION_KEY not in node_config:
        raise ConfigError(f"node config {dict(node_config)} has neither `{SITE_KEY}` nor `{PARTITION_KEY}`")
    return _scenario_site(run.scenario, run.config.seed, int(node_config[PARTITION_KEY]))


def partition_of(node_config: Mapping[str, Any]) -> int:
    return int(node_config.get(PARTITION_KEY, -1))


@functools.lru_cache(maxsize=8)
def _site_from_yaml(path: str) -> Site:
    return load_site(path)


@functools.lru_cache(maxsize=8)
def _scenario_site(scenario: str, seed: int, partition: int) -> Site:
    return scenario_sites(load_scenario(scenario), seed, only=partition)[0]
