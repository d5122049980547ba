"""Long-lived processes (the server's SuperLink and proxy, a site's SuperNode): run them in the foreground
under a small supervisor, or detached with a pid file and a log, and stop them again.

`supervise` is what `--foreground` runs (and what systemd should run): it starts the children, forwards
SIGTERM / SIGINT to them, and stops them all as soon as one of them ends, returning its exit code.
`detach` runs a `--foreground` command in its own session with its output in a log file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from shared.errors import UserError

APP_ROOT = Path(__file__).resolve().parent.parent  # the Flower app's folder (`flwr run` starts here)
VENV_BIN = Path(sys.executable).parent  # fedretina's and Flower's executables
STOP_GRACE_S = 10.0


class DaemonError(UserError):
    """A daemon could not be started, found or stopped."""

    exit_code = 6


def supervise(commands: Sequence[tuple[Sequence[str], Path]], env: Mapping[str, str], cwd: Path) -> int:
    """Run every (argv, log file) together until one ends or a signal asks to stop; returns the exit code
    of the first to end (0 when stopped by a signal). Each child's output is appended to its log."""
    children: list[subprocess.Popen] = []
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    try:
        for argv, log in commands:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("ab") as out:
                children.append(
                    subprocess.Popen(
                        argv,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=dict(env),
                        cwd=cwd,
                        start_new_session=True,
                    )
                )  # each in its own group: stopping it stops what it spawned (SuperExec, app processes)
        while not stopping:
            ended = [c for c in children if c.poll() is not None]
            if ended:
                return ended[0].returncode
            time.sleep(0.2)
        return 0
    finally:
        for child in children:
            _terminate(child)


def detach(
    argv: Sequence[str], log: Path, pidfile: Path, env: Mapping[str, str], cwd: Path
) -> subprocess.Popen:
    """Start `argv` in its own session (it outlives this command), output appended to `log`; its pid goes
    to `pidfile`. Refuses when the pid file names a live process."""
    if (pid := running(pidfile)) is not None:
        raise DaemonError(f"{pidfile}: already running as process {pid}; stop it first")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    pidfile.write_text(f"{process.pid}\n")
    return process


def running(pidfile: Path) -> int | None:
    """The pid in `pidfile` if that process is alive."""
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def stop(pidfile: Path) -> bool:
    """Stop the detached process group of `pidfile` (SIGTERM, then SIGKILL after a grace period), and
    every process below it."""
    pid = running(pidfile)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return False
    family = descendants(pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while running(pidfile) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    for target in family:  # whatever its own shutdown left behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    return True


def wait_for_port(host: str, port: int, timeout_s: float, process: subprocess.Popen, log: Path) -> None:
    """Wait until something accepts connections on host:port; fail at once if `process` ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        if process.poll() is not None:
            raise DaemonError(
                f"it ended (exit code {process.returncode}) before listening on {port}: {_last(log)}"
            )
        time.sleep(0.2)
    raise DaemonError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s; see {log}")


def this_command() -> list[str]:
    """The argv that runs `fedretina` again, in this environment."""
    return [str(VENV_BIN / "fedretina")]


def _last(log: Path) -> str:
    """The last line of a log (what a process that ended early said last)."""
    lines = (
        [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        if log.exists()
        else []
    )
    return lines[-1].strip() if lines else f"see {log}"


def _terminate(child: subprocess.Popen) -> None:
    """Stop a child, its process group and every process it started (Flower's SuperExec puts the app
    processes it starts in a group of its own, and they outlive it): SIGTERM, then SIGKILL whatever is
    left after the grace period."""
    family = descendants(child.pid)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(STOP_GRACE_S if signum == signal.SIGTERM else None)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` in the process tree (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for kid in children.get(todo.pop(), []):
            found.append(kid)
            todo.append(kid)
    return found
