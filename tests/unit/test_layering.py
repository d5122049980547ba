"""Architecture rules that keep the picture true: `shared` never imports Flower, and the deployable `client`
and `server` packages never import the `simulation` package."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import importlib, pkgutil, sys
import shared
for mod in pkgutil.walk_packages(shared.__path__, "shared."):
    importlib.import_module(mod.name)
loaded = sorted(m for m in sys.modules if m == "flwr" or m.startswith("flwr."))
print(len([m for m in sys.modules if m.startswith("shared")]), loaded)
"""


def test_importing_every_shared_module_loads_no_flwr() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    count, loaded = result.stdout.strip().split(" ", 1)
    assert int(count) > 3, "the probe imported no shared modules"
    assert loaded == "[]", f"shared imports flwr: {loaded}"


APPS_PROBE = """
import importlib, json, pkgutil, sys
import client, server
failed = {}
for pkg in (client, server):
    for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        try:
            importlib.import_module(mod.name)
        except Exception as exc:  # reported by the test, so one broken module does not hide the rest
            failed[mod.name] = repr(exc)
print(json.dumps({
    "client": sorted(m for m in sys.modules if m.startswith("client.")),
    "server": sorted(m for m in sys.modules if m.startswith("server.")),
    "simulation": sorted(m for m in sys.modules if m == "simulation" or m.startswith("simulation.")),
    "failed": failed,
}))
"""


def test_importing_every_client_and_server_module_loads_no_simulation_module() -> None:
    result = subprocess.run([sys.executable, "-c", APPS_PROBE], capture_output=True, text=True, check=True)
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"client.app", "client.site"} <= set(probe["client"]), "the probe imported no client modules"
    assert {"server.app", "server.strategy"} <= set(probe["server"]), "the probe imported no server modules"
    assert probe["simulation"] == [], f"client or server imports simulation: {probe['simulation']}"
    assert probe["failed"] == {}, f"client or server modules that do not import: {probe['failed']}"
