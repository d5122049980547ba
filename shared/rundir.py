"""One directory per run, `runs/<name>/`, holding the resolved config, the log and every output."""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.config import ExperimentConfig, dump_config
from shared.errors import ConfigError
from shared.logs import add_logfile
from shared.names import check_run_name, inside


def run_dir(config: ExperimentConfig, part: str, name: str | None = None) -> Path:
    """`runs/<name>/<part>/`: where one command's outputs (pretrain, finetune, federation) go. The name is
    checked (a run name from the command line or the run config); the folder never leaves `runs_dir`."""
    try:
        return inside(Path(config.runs_dir), check_run_name(name or config.name), part)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def start_run_dir(config: ExperimentConfig, part: str, name: str | None = None) -> Path:
    """Create the part's folder and record the resolved config and the log there (call after any refusal to
    overwrite, so a refused command leaves the earlier run's record alone)."""
    path = run_dir(config, part, name)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "config.yaml", dump_config(config))
    add_logfile(path / "log.txt")
    return path


PRIVATE_UMASK = 0o077  # folders 0700, files 0600: a run's and a site's files are their owner's only


def private_files() -> None:
    """From now on this process (and what it starts) makes folders 0700 and files 0600. Every entry point
    that writes a run's or a site's files calls it first: the CLI, the ServerApp, each ClientApp, the gate,
    the SuperLink."""
    os.umask(PRIVATE_UMASK)


def private_dir(path: Path, *, tree: bool = False) -> Path:
    """`path` as a folder of its owner's only: made 0700, or an existing one tightened (with `tree`, all it
    holds too: a state folder an older version, or another tool, left readable by others)."""
    path.mkdir(parents=True, exist_ok=True)
    for inner in [path, *(path.rglob("*") if tree else ())]:
        if not inner.is_symlink():
            inner.chmod(inner.stat().st_mode & ~PRIVATE_UMASK & 0o7777)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Named arrays as one .npz file (numpy's format, loaded without pickle), written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


@dataclass(frozen=True)
class Report:
    """What a command that reports leaves: its folder, and the markdown table it writes there and prints."""

    directory: Path
    table: str
