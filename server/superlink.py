"""`fedretina-superlink`: Flower's own SuperLink, with a longer SQLite busy timeout and a guard in front of
its Fleet API.

Flower 1.41 opens its state database with `busy_timeout = 5000`. When two sites push their replies at
once, one write transaction (a reply's object tree) can hold the database for longer than that on a busy
machine, and the other requests fail with "database is locked" (HTTP 500), which ends the ServerApp. We
saw it on our 2-core test machine; waiting longer for the lock is all it takes.

Flower reads a Fleet request's body before checking who sent it; `server/fleet_guard.py` refuses unsigned
and oversized requests from their headers first, as the outermost layer of Flower's own web app.
Everything else is Flower's `flower-superlink`, arguments included.
"""

from __future__ import annotations

from collections.abc import Callable

import flwr.supercore.sql_mixin as sql_mixin
import flwr.superlink.main as flower_app
from flwr.superlink.cli.flower_superlink import flower_superlink
from starlette.middleware import Middleware

from server.fleet_guard import FleetGuard
from shared.rundir import private_files

BUSY_TIMEOUT_MS = 120_000


def main() -> None:
    private_files()  # superlink.db and its journal: the operator's only
    flower_app._get_middleware = _guarded(flower_app._get_middleware)
    sql_mixin.SQLITE_PRAGMAS = tuple(
        (name, str(BUSY_TIMEOUT_MS) if name == "busy_timeout" else value)
        for name, value in sql_mixin.SQLITE_PRAGMAS
    )
    flower_superlink()


def _guarded(middleware: Callable[[], list[Middleware]]) -> Callable[[], list[Middleware]]:
    """Flower's middleware list with the Fleet guard first (outermost: it runs before anything reads)."""
    return lambda: [Middleware(FleetGuard), *middleware()]
