"""Process supervision for the server and site daemons: stopping a daemon stops everything it started,
including processes in groups of their own (Flower's SuperExec starts its app processes so)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from shared.daemon import detach, running, stop

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
        "import pathlib, sys; from shared.daemon import supervise; "
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
