"""A site's daemon and its data: the node config's site YAML is the only data a ClientApp reads (a scenario
the server names cannot override it), the SuperNode is given exactly that path and the site's own key, and
a site never writes inside its dataset (a read-only root checks fine, its state outside)."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from client.daemon import SiteDaemon, site_keys
from client.node import node_site
from shared.config import load_config
from shared.data.site_config import load_site_config
from shared.errors import ConfigError
from shared.federation.wire import RunSpec
from tests.conftest import FEDRETINA, UID, write_site


def test_a_node_serves_its_own_site_and_refuses_a_scenario_the_server_names(
    tiny_sites: dict[str, Path],
) -> None:
    node = {"site-config": str(tiny_sites["mmac"]), "partition-id": 0}
    site = node_site(node, RunSpec(load_config(profile="tiny"), UID, scenario=""))
    root = load_site_config(tiny_sites["mmac"]).root
    assert site.name == "mmac" and all(Path(p).is_relative_to(root) for p in site.rows["path"])
    asking = RunSpec(load_config(profile="tiny"), UID, scenario="natural")  # a server asking for other data
    with pytest.raises(ConfigError, match="scenario 'natural'; it serves its site YAML only"):
        node_site(node, asking)


def test_the_supernode_gets_the_site_yaml_its_ca_and_its_own_key(tiny_sites: dict[str, Path]) -> None:
    config = load_site_config(tiny_sites["eyepacs"])
    private, public = site_keys(config)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and public.read_text().startswith(
        "ecdsa-sha2-nistp384 "
    )
    assert (
        site_keys(config) == (private, public) and private.read_bytes() == site_keys(config)[0].read_bytes()
    )
    command = SiteDaemon(config, "fl.example.org:9092", Path("/ca.crt"), private, 9100).command()
    assert command[command.index("--node-config") + 1] == f'site-config="{tiny_sites["eyepacs"].resolve()}"'
    assert command[command.index("--auth-supernode-private-key") + 1] == str(private)
    assert "--insecure" not in command and command[command.index("--root-certificates") + 1] == "/ca.crt"
    assert not any(Path(part).is_relative_to(config.root) for part in command)  # no data path but its YAML


def test_a_read_only_dataset_is_checked_without_writing_in_it(tmp_path: Path) -> None:
    site = yaml.safe_load(write_site(tmp_path, "eyepacs", 6).read_text())
    del site["state_dir"]  # the default: outside the dataset
    (tmp_path / "eyepacs.yaml").write_text(yaml.safe_dump(site))
    root, state = Path(site["root"]), tmp_path / "xdg-state"
    command = [FEDRETINA, "site", "check", str(tmp_path / "eyepacs.yaml")]
    if os.geteuid() == 0:  # root writes anywhere: give it the dataset as a read-only bind mount
        mount = f"mount --bind {root} {root} && mount -o remount,ro,bind {root} {root}"
        command = ["unshare", "-m", "sh", "-c", f"{mount} && exec {shlex.join(command)}"]
    else:
        for path in [root, *root.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
    before = sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*"))
    env = {**os.environ, "XDG_STATE_HOME": str(state)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*")) == before  # nothing written in it
    assert (state / "fedretina" / "sites" / "eyepacs" / "check" / "report.json").is_file()
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
