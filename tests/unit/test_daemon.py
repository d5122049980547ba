"""Process supervision for the server and site daemons: stopping a daemon stops everything it started,
including processes in groups of their own (Flower's SuperExec starts its app processes so)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shared.operations.daemon import detach, marked, running, stop

ROOT = Path(__file__).resolve().parents[2]


def alive(marker: str) -> list[int]:
    """The `sleep` processes named by `marker` (not the shells whose command lines mention them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            if argv.startswith(marker):
                found.append(int(entry.name))
    return found


def test_stopping_a_daemon_stops_the_processes_its_children_started_in_their_own_groups(
    tmp_path: Path,
) -> None:
    marker = f"sleep 3{os.getpid() % 1000:03d}"  # unique to this test run
    family = f"setsid {marker}1 & {marker}2"  # a child in a session of its own, as SuperExec's are
    supervisor = (
        "import pathlib, sys; from shared.operations.daemon import supervise; "
        f"supervise([(['bash', '-c', {family!r}], pathlib.Path({str(tmp_path / 'child.log')!r}))], "
        "{'PATH': '/usr/bin:/bin'}, pathlib.Path('.'))"
    )
    pidfile = tmp_path / "daemon.pid"
    detach([sys.executable, "-c", supervisor], tmp_path / "daemon.log", pidfile, dict(os.environ), ROOT)
    deadline = time.monotonic() + 30
    while len(alive(marker)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(alive(marker)) == 2
    assert stop(pidfile) and running(pidfile) is None
    time.sleep(0.5)
    assert alive(marker) == []


def _supervisor(tmp_path: Path, family: str, restart: str = "None") -> str:
    return (
        "import pathlib, sys; from shared.operations.daemon import supervise; "
        f"sys.exit(supervise([(['bash', '-c', {family!r}], pathlib.Path({str(tmp_path / 'child.log')!r}))], "
        f"{{'PATH': '/usr/bin:/bin', 'FEDRETINA_DAEMON': {str(tmp_path.resolve())!r}}}, "
        f"pathlib.Path({str(tmp_path)!r}), "
        f"restart={restart}))"
    )


def _wait(condition, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return bool(condition())


def test_a_killed_supervisor_takes_its_tree_down_and_stop_finds_what_is_left(tmp_path: Path) -> None:
    """SIGKILL the supervisor: its child dies with it (parent-death signal); a grandchild in a session of
    its own, as Flower's SuperExec starts its apps, is found by the daemon's marker and stopped."""
    marker = f"sleep 4{os.getpid() % 1000:03d}"
    family = f"setsid {marker}1 & exec {marker}2"  # the child is `sleep ...2`, its own-session child `...1`
    pidfile = tmp_path / "daemon.pid"
    env = dict(os.environ)
    supervisor = detach(
        [sys.executable, "-c", _supervisor(tmp_path, family)], tmp_path / "d.log", pidfile, env, ROOT
    )
    assert _wait(lambda: len(alive(marker)) == 2)
    os.kill(supervisor.pid, signal.SIGKILL)
    supervisor.wait()
    assert _wait(lambda: len(alive(marker)) == 1)  # the child went with it; the detached grandchild did not
    assert running(pidfile) is None and marked(tmp_path) == alive(marker)
    assert stop(pidfile, tmp_path)  # "stopped": it found the leftover by its marker
    assert _wait(lambda: alive(marker) == [], 15) and not stop(pidfile, tmp_path)


def test_the_supervisor_starts_a_child_again_while_restart_says_so(tmp_path: Path) -> None:
    """A child that ends with a refusal is started again (after a pause) until `restart` says no; the
    supervisor then returns the child's last exit code, and `restart` saw only that start's output."""
    family = (
        'n=$(cat count 2>/dev/null || echo 0); echo $((n+1)) > count; echo "try $((n+1)) refused"; exit 7'
    )
    restart = "lambda code, said, elapsed: code == 7 and 'try 1 ' in said"
    done = subprocess.run(
        [sys.executable, "-c", _supervisor(tmp_path, family, restart)], cwd=ROOT, timeout=60
    )
    log = (tmp_path / "child.log").read_text()
    assert done.returncode == 7 and log.splitlines() == ["try 1 refused", "try 2 refused"]
