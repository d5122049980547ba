"""Long-lived processes (the server's SuperLink and proxy, a site's SuperNode): run them in the foreground
under a small supervisor, or detached with a pid file and a log, and stop them again.

`supervise` is what `--foreground` runs (and what systemd should run): it starts the children, forwards
SIGTERM / SIGINT to them, and stops them all as soon as one of them ends, returning its exit code (unless
the caller's `restart` says to start that child again). `detach` runs a `--foreground` command in its own
session with its output in a log file.

The whole tree is managed: every process of a daemon carries its folder in its environment (`MARKER`), so
`stop` finds what a dead supervisor left behind (Flower's SuperExec and app processes run in sessions of
their own), and the supervisor's children die with it (the kernel's parent-death signal).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from shared.errors import UserError

APP_ROOT = Path(__file__).resolve().parents[2]  # the Flower app's folder (`flwr run` starts here)
VENV_BIN = Path(sys.executable).parent  # fedretina's and Flower's executables
STOP_GRACE_S = 10.0
MARKER = "FEDRETINA_DAEMON"  # in every daemon process's environment: the daemon's folder
RESTART_DELAY_S = 5.0
ALIVE_EVERY_S = 5.0
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
Restart = Callable[[int, str, float], bool]  # (exit code, its log since it started, seconds since the first)


class DaemonError(UserError):
    """A daemon could not be started, found or stopped."""

    exit_code = 6


def supervise(
    commands: Sequence[tuple[Sequence[str], Path]],
    env: Mapping[str, str],
    cwd: Path,
    restart: Restart | None = None,
    alive: Path | None = None,
) -> int:
    """Run every (argv, log file) together until one ends or a signal asks to stop; returns the exit code
    of the first to end (0 when stopped by a signal). Each child's output is appended to its log. A child
    that ends is started again, after a pause, while `restart(code, what it logged, seconds since the
    first start)` says so. `alive`, if given, is touched every few seconds while the children run (a
    restarted daemon reads from it when it last ran)."""
    children: list[subprocess.Popen] = []
    starts: list[tuple[float, int]] = []  # (when, log offset) of each child's latest start
    first = time.monotonic()
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    try:
        for argv, log in commands:
            children.append(_child(argv, log, env, cwd))
            starts.append((time.monotonic(), _size(log)))
        touched = 0.0
        while not stopping:
            if alive is not None and time.monotonic() - touched > ALIVE_EVERY_S:
                alive.touch()
                touched = time.monotonic()
            for i, child in enumerate(children):
                code = child.poll()
                if code is None:
                    continue
                argv, log = commands[i]
                said = _read_from(log, starts[i][1])
                if restart is None or not restart(code, said, time.monotonic() - first):
                    return code
                _wait(RESTART_DELAY_S, lambda: stopping)
                if stopping:
                    return 0
                children[i] = _child(argv, log, env, cwd)
                starts[i] = (time.monotonic(), _size(log))
            time.sleep(0.2)
        return 0
    finally:
        for child in children:
            _terminate(child)


def _child(argv: Sequence[str], log: Path, env: Mapping[str, str], cwd: Path) -> subprocess.Popen:
    """A child in its own group (stopping it stops what it spawned), dying with this process."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def _die_with_parent() -> None:
    """In the child, before exec: the kernel sends it SIGTERM when its parent (the supervisor) dies, even
    by SIGKILL; Flower's SuperExec and app processes watch their parents in turn (--parent-pid)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait(seconds: float, stop: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop():
        time.sleep(0.2)


def _size(log: Path) -> int:
    return log.stat().st_size if log.exists() else 0


def _read_from(log: Path, offset: int) -> str:
    if not log.exists():
        return ""
    with log.open("rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


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


def stop(pidfile: Path, folder: Path | None = None) -> bool:
    """Stop the detached process group of `pidfile` (SIGTERM, then SIGKILL after a grace period), every
    process below it, and every process marked with the daemon's `folder` (what a killed supervisor left
    running); True when something was stopped."""
    pid = running(pidfile)
    family = descendants(pid) if pid is not None else []
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while running(pidfile) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
    left = marked(folder) if folder is not None else []
    for target in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGTERM)
    _wait(STOP_GRACE_S if left else 0, lambda: not any(_alive(p) for p in left))
    for target in [*family, *left]:  # whatever its own shutdown left behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    return pid is not None or bool(left)


def marked(folder: Path) -> list[int]:
    """Every process (of this user) whose environment names daemon `folder` (Linux /proc)."""
    needle = f"{MARKER}={folder.resolve()}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def wait_for_line(log: Path, offset: int, wanted: str, timeout_s: float, process: subprocess.Popen) -> str:
    """The first line containing `wanted` that `log` gains after `offset`; a `DaemonError` naming the last
    thing the process said when it ends first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in _read_from(log, offset).splitlines():
            if wanted in line:
                return line
        if process.poll() is not None:
            raise DaemonError(f"it ended (exit code {process.returncode}): {_last(log)}")
        time.sleep(0.5)
    raise DaemonError(f"not ready after {timeout_s:.0f} s ({_last(log)}); it keeps trying, see {log}")


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
