"""`fedretina-superlink`: Flower's own SuperLink, with a longer SQLite busy timeout.

Flower 1.41 opens its state database with `busy_timeout = 5000`. When two sites push their replies at
once, one write transaction (a reply's object tree) can hold the database for longer than that on a busy
machine, and the other requests fail with "database is locked" (HTTP 500), which ends the ServerApp. We
saw it on our 2-core test machine; waiting longer for the lock is all it takes. Everything else is
Flower's `flower-superlink`, arguments included.
"""

from __future__ import annotations

import flwr.supercore.sql_mixin as sql_mixin
from flwr.superlink.cli.flower_superlink import flower_superlink

BUSY_TIMEOUT_MS = 120_000


def main() -> None:
    sql_mixin.SQLITE_PRAGMAS = tuple(
        (name, str(BUSY_TIMEOUT_MS) if name == "busy_timeout" else value)
        for name, value in sql_mixin.SQLITE_PRAGMAS
    )
    flower_superlink()
