"""One log format for every command, and progress bars that stay quiet in non-interactive logs."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


def setup_logging(verbosity: int = 0, logfile: Path | None = None) -> None:
    """Configure the root logger once: -q (-1) warnings only, default info, -v (1) debug.

    Replaces earlier handlers so calling it again (a second command in one process, a test) does not
    duplicate lines. Noisy third-party loggers stay at warning unless -v.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    level = LEVELS[max(-1, min(1, verbosity))]
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    stream.fedretina_console = True  # type: ignore[attr-defined]
    root.addHandler(stream)
    root.setLevel(level)
    if logfile is not None:
        add_logfile(logfile)
    for name in ("PIL", "matplotlib", "urllib3", "filelock", "httpx", "httpcore", "alembic"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity > 1 else logging.WARNING)


def add_logfile(path: Path) -> None:
    """Also write every line the root logger passes into `path` (a run's `log.txt`), instead of the previous
    run's file if one was open: runs in one process never write into each other's logs."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "fedretina_run_log", False)]:
        root.removeHandler(old)
        old.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    handler.fedretina_run_log = True  # type: ignore[attr-defined]
    root.addHandler(handler)


class _Summary(logging.Filter):
    def __init__(self, loggers: tuple[str, ...]) -> None:
        super().__init__()
        self.loggers = loggers

    def filter(self, record: logging.LogRecord) -> bool:
        named = any(record.name == n or record.name.startswith(f"{n}.") for n in self.loggers)
        return record.levelno >= logging.WARNING or named


def console_shows(*loggers: str) -> None:
    """Keep the console to a summary: INFO lines only from `loggers` (and their children), warnings and
    errors from any. The run's log file (`add_logfile`) still receives every line."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, "fedretina_console", False):
            handler.addFilter(_Summary(loggers))


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """A progress bar on an interactive terminal, nothing in CI or log files (tqdm's disable=None)."""
    return iter(
        tqdm(iterable, desc=desc, total=total, unit=unit, disable=None, leave=False, dynamic_ncols=True)
    )


def progress_bar(desc: str, total: int | None = None, unit: str = "it") -> tqdm:
    """A manually updated bar (`bar.update(n)`, `bar.set_postfix(...)`) with the same TTY rule."""
    return tqdm(desc=desc, total=total, unit=unit, disable=None, leave=False, dynamic_ncols=True)
