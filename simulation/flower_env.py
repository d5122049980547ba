"""The environment every Flower command of this project runs in.

- `FLWR_HOME` is project-local (`.flwr/`, git-ignored): its config, the local SuperLink's state and log, and
  the installed app copies stay with this checkout.
- Runtime dependency installation is off: otherwise the SuperLink `uv sync`s the app for every run and pulls a
  CUDA torch from the index.
- The local SuperLink's two ports are derived from the `FLWR_HOME` path, so two checkouts (or the tests
  beside a running demo) never talk to each other's SuperLink; they sit outside the ranges the kernel and Ray
  hand out, which would otherwise make a start fail now and then with the port in use.
- Ray puts the SuperLink's working directory first on every actor's import path; with top-level packages
  named client/server/shared that directory must be this project, so start `flwr run .` from the project root.
  That directory is also every ServerApp's and ClientApp's working directory: relative data paths in run
  configs and scenarios are read from it.
- The venv's `bin` leads PATH: `flwr run` starts `flower-superlink` by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

from shared.operations.daemon import APP_ROOT, VENV_BIN

PROJECT_ROOT = APP_ROOT


def flower_env(home: Path | None = None, ray_address: str | None = None) -> dict[str, str]:
    """Variables to export before any `flwr` command (only those; merge with `os.environ` yourself).
    `ray_address` (HOST:PORT) attaches the local SuperLink's simulations to a running Ray cluster: Flower's
    Ray backend calls `ray.init()`, which joins the cluster `RAY_ADDRESS` names. Without it, `local`: a
    bare `ray.init()` joins the last cluster any `ray start` on this machine left in
    /tmp/ray/ray_current_cluster (someone else's, busy, or long dead), so a simulation always starts its
    own unless told otherwise."""
    home = (home or PROJECT_ROOT / ".flwr").resolve()
    digest = int.from_bytes(hashlib.blake2b(str(home).encode(), digest_size=4).digest(), "little")
    # 20000..31998, even (control API on the next port): below Linux's ephemeral range (32768+), where any
    # outgoing connection (Ray opens many) can hold a port, and above Ray's worker ports (10002..19999)
    http_port = 20000 + 2 * (digest % 6000)
    return {
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(http_port + 1),
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_ADDRESS": ray_address or "local",
    }


def flwr_run_command(nodes: int, run_config: Mapping[str, object], cpus_per_node: int = 1) -> list[str]:
    """`flwr run . --stream` of this app's simulation with `nodes` sites and the given run config (its
    `set` entry a string of overrides: `override_string`)."""
    config = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
    return [
        str(VENV_BIN / "flwr"),
        "run",
        ".",
        "--stream",
        "--federation-config",
        f"num-supernodes={nodes} client-resources-num-cpus={cpus_per_node}",
        "--run-config",
        config,
    ]


def override_string(overrides: Mapping[str, object]) -> str:
    """The run config's `set` string from dotted overrides ({"federation.rounds_pretrain": 2})."""
    return " ".join(f"{k}={shlex.quote(str(v))}" for k, v in overrides.items())


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return '"' + str(value).replace('"', '\\"') + '"'


def shell_exports(env: dict[str, str]) -> str:
    """`export K=V ...` for `eval "$(fedretina env)"`; PATH keeps the shell's own `$PATH` after the venv."""
    parts = [f"{k}={shlex.quote(v)}" for k, v in env.items() if k != "PATH"]
    parts.append(f'PATH={shlex.quote(str(VENV_BIN))}:"$PATH"')
    return "export " + " ".join(parts)


def stop_local_superlink(env: dict[str, str]) -> bool:
    """Stop the detached local SuperLink that `flwr run` started for this `FLWR_HOME` (True if one ran).

    The SuperLink runs in its own session; killing its process group also ends the SuperExec and any
    simulation it spawned.
    """
    port = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    found = subprocess.run(
        ["pgrep", "-f", f"flower-superlink --insecure --simulation .*--port {port}"],
        capture_output=True,
        text=True,
        check=False,
    )
    pids = [int(p) for p in found.stdout.split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(pid), signal.SIGTERM)
    return bool(pids)
