"""One directory per run, `runs/<name>/`, holding the resolved config, the log and every output."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shared.config import ExperimentConfig, dump_config
from shared.logs import add_logfile


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def create(cls, config: ExperimentConfig, name: str | None = None) -> RunDir:
        """Make `runs/<name>/`, write `config.yaml` (the resolved config) and start `log.txt`."""
        run = cls(Path(config.runs_dir) / (name or config.name))
        run.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.path / "config.yaml", dump_config(config))
        add_logfile(run.path / "log.txt")
        return run

    def sub(self, *parts: str) -> Path:
        """A subdirectory of the run, created on demand."""
        path = self.path.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
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
