"""Which site this node is: a site YAML named in the node config (deployment), or the scenario's site for
this partition id (simulation, where Flower gives a node nothing but its partition id)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.config import RunOptions
from shared.data.checks import load_site
from shared.data.scenario import load_scenario, scenario_sites
from shared.data.site import Site
from shared.errors import ConfigError

SITE_KEY = "site-config"


def resolve_site(node_config: Mapping[str, Any], options: RunOptions, seed: int) -> Site:
    if SITE_KEY in node_config:
        return load_site(str(node_config[SITE_KEY]))
    if not options.scenario:
        raise ConfigError(
            f"this node has no `{SITE_KEY}` in its node config and the run names no scenario; start the "
            f"SuperNode with --node-config '{SITE_KEY}=\"/path/to/site.yaml\"'"
        )
    if "partition-id" not in node_config:
        raise ConfigError(f"node config {dict(node_config)} has neither `{SITE_KEY}` nor `partition-id`")
    return scenario_sites(load_scenario(options.scenario), seed, only=int(node_config["partition-id"]))[0]
