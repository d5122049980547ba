"""Architecture rules that keep the picture true: `shared` never imports Flower."""

from __future__ import annotations

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
