"""Architecture rules that keep the picture true: `shared` never imports Flower, the deployable `client` and
`server` packages never import the `simulation` package (nor each other), no import runs back up a layer,
and no module imports itself round a cycle (TYPE_CHECKING and function-level imports included); the ClientApp
imports neither opacus nor scikit-learn's clustering."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

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
    assert {"client.app", "client.node"} <= set(probe["client"]), "the probe imported no client modules"
    assert {"server.app", "server.strategy"} <= set(probe["server"]), "the probe imported no server modules"
    assert probe["simulation"] == [], f"client or server imports simulation: {probe['simulation']}"
    assert probe["failed"] == {}, f"client or server modules that do not import: {probe['failed']}"


# Layers, lowest first: a module imports only from its own layer or below (every import counted: at the top,
# inside functions and under TYPE_CHECKING). `client` and `server` are one layer and never import each other.
LAYERS = (
    ("shared.errors", "shared.names"),
    ("shared.federation.strategies",),  # numpy only: the config checks a run against it
    ("shared.config", "shared.seeding", "shared.logs", "shared.plots"),
    ("shared.rundir", "shared.weights", "shared.device", "shared.operations", "shared.cli_common"),
    ("shared.data", "shared.spark", "shared.privacy"),
    ("shared.metrics", "shared.models"),
    ("shared.training", "shared.analysis"),
    ("shared.federation",),
    ("client", "server"),
    ("simulation",),
)
PACKAGES = ("shared", "client", "server", "simulation")


def import_graph() -> dict[str, set[str]]:
    """Our module -> our modules it imports, read from the source (so nothing is left out by a branch)."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path

    def ours(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            graph[name] |= {t for t in map(ours, targets) if t and t != name}
    return graph


def layer(module: str) -> int:
    for rank, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def test_no_import_runs_back_up_a_layer_and_client_and_server_stay_apart() -> None:
    upward = [
        f"{a} -> {b}"
        for a, targets in import_graph().items()
        for b in targets
        if a != "shared" and b != "shared" and layer(b) > layer(a)
    ]
    across = [
        f"{a} -> {b}"
        for a, targets in import_graph().items()
        for b in targets
        if {a.split(".")[0], b.split(".")[0]} == {"client", "server"}
    ]
    assert upward == [] and across == [], upward + across


def test_the_import_graph_has_no_cycle() -> None:
    graph, state, cycles = import_graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == [], cycles


def test_the_client_app_imports_neither_opacus_nor_sklearns_clustering() -> None:
    """A deployed site starts a new ClientApp process for every message (Flower's design), so what its
    import pulls in is paid per message: opacus (DP only) and scikit-learn's clustering (camera splits only)
    are imported where they are used."""
    probe = "import sys, client.app; print([m for m in ('opacus', 'sklearn.cluster') if m in sys.modules])"
    found = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout.strip() == "[]", found.stdout + found.stderr
