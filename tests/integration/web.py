"""The dashboard served by the real CLI, for browser tests: `fedretina dashboard` on a free port, and
screenshots kept when FEDRETINA_SCREENSHOTS names a folder (docs/img holds the committed ones)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import FEDRETINA


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def dashboard(root: Path, *extra: str) -> Iterator[str]:
    """`fedretina dashboard root` on a free port; yields its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [FEDRETINA, "dashboard", str(root), "--port", str(port), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert process.poll() is None, process.stdout.read()  # type: ignore[union-attr]
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def screenshot(page: object, name: str) -> None:
    folder = os.environ.get("FEDRETINA_SCREENSHOTS")
    if folder:
        page.screenshot(path=str(Path(folder) / f"dashboard-{name}.png"), full_page=True)  # type: ignore[attr-defined]
