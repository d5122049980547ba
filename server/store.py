"""The run store: one SQLite file per run directory, written by the ServerApp (`RunStore`), read by people
and tools through `StoreReader` only: the schema is spelt here and nowhere else.

Tables: runs, sites, rounds, replies (one row per site per round: site name, node id as TEXT since Flower's
node ids are uint64, examples, metrics, duration, bytes, update norm, cosine to the aggregate, accepted or
rejected with the reason), metrics (global, per round and source), checkpoints and events. Every write is
its own transaction, so a killed server leaves a consistent store. A damaged file is a one-line
`StoreError` for writer and readers alike.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import UserError

SCHEMA_VERSION = 3  # 2: rows keyed by run_name, runs hold the run uid and Flower's run id; 3: reply fates


class StoreError(UserError):
    """A run store this version cannot read or extend."""


SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_name TEXT PRIMARY KEY, run_uid TEXT, flower_run TEXT, started REAL, finished REAL, status TEXT,
    scenario TEXT, strategy TEXT, config TEXT);
CREATE TABLE IF NOT EXISTS sites (
    run_name TEXT, node_id TEXT, site TEXT, partition INTEGER, images INTEGER, tasks TEXT, joined REAL,
    PRIMARY KEY (run_name, node_id));
CREATE TABLE IF NOT EXISTS rounds (
    run_name TEXT, phase TEXT, round INTEGER, started REAL, finished REAL, sampled INTEGER, replied INTEGER,
    accepted INTEGER, status TEXT, PRIMARY KEY (run_name, phase, round));
CREATE TABLE IF NOT EXISTS replies (
    run_name TEXT, phase TEXT, round INTEGER, kind TEXT, site TEXT, node_id TEXT, num_examples INTEGER,
    metrics TEXT, duration REAL, bytes INTEGER, update_norm REAL, cosine REAL, accepted INTEGER, reason TEXT,
    aggregated INTEGER, error_code INTEGER, attempt INTEGER);
CREATE TABLE IF NOT EXISTS metrics (
    run_name TEXT, phase TEXT, round INTEGER, source TEXT, key TEXT, value REAL);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_name TEXT, phase TEXT, round INTEGER, path TEXT, created REAL, PRIMARY KEY (run_name, phase, round));
CREATE TABLE IF NOT EXISTS events (
    run_name TEXT, time REAL, level TEXT, kind TEXT, message TEXT);
"""


TEST_KIND = "test"  # replies scoring the final model on each site's held-out test patients
CROSS_KIND = "cross:"  # + a site's name: the kind of replies scoring that site's local model (cross-site)


@dataclass(frozen=True)
class Reply:
    phase: str
    round: int
    kind: str  # "train", "evaluate", "test" (the final model) or CROSS_KIND + a site
    site: str
    node_id: int
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    duration: float = math.nan
    bytes: int = 0
    update_norm: float | None = None
    cosine: float | None = None
    accepted: bool = True
    reason: str = ""
    aggregated: bool = False  # averaged into the round's new global model (the account a replay follows)
    error_code: int | None = None  # Flower's ErrorCode of an error reply
    attempt: int = 1  # the round's attempt (a short round may be tried again)


class RunStore:
    def __init__(self, path: Path, run_name: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.run_name = path, run_name
        with self._db() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
            if tables and version != SCHEMA_VERSION:
                raise StoreError(
                    f"{path}: a run store of another fedretina version (schema {version}, this one reads "
                    f"{SCHEMA_VERSION}); choose another run-name"
                )
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with _damage_named(self.path):
            db = sqlite3.connect(self.path, timeout=30)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                with db:  # one transaction
                    yield db
            finally:
                db.close()

    def start_run(
        self, run_uid: str, flower_run: int, scenario: str, strategy: str, config: dict[str, Any]
    ) -> None:
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, NULL, 'running', ?, ?, ?)",
                (
                    self.run_name,
                    run_uid,
                    str(flower_run),
                    time.time(),
                    scenario,
                    strategy,
                    json.dumps(config),
                ),
            )

    def finish_run(self, status: str) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE runs SET finished = ?, status = ? WHERE run_name = ?",
                (time.time(), status, self.run_name),
            )

    def add_site(self, node_id: int, site: str, partition: int, images: int, tasks: list[str]) -> None:
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO sites VALUES (?, ?, ?, ?, ?, ?, ?)",
                (self.run_name, str(node_id), site, partition, images, ",".join(tasks), time.time()),
            )

    def round_started(self, phase: str, rnd: int, sampled: int) -> None:
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, NULL, ?, NULL, NULL, 'running')",
                (self.run_name, phase, rnd, time.time(), sampled),
            )

    def round_finished(self, phase: str, rnd: int, replied: int, accepted: int, status: str) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE rounds SET finished = ?, replied = ?, accepted = ?, status = ? "
                "WHERE run_name = ? AND phase = ? AND round = ?",
                (time.time(), replied, accepted, status, self.run_name, phase, rnd),
            )

    def add_reply(self, r: Reply) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO replies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.run_name,
                    r.phase,
                    r.round,
                    r.kind,
                    r.site,
                    str(r.node_id),
                    r.num_examples,
                    json.dumps(r.metrics),
                    r.duration,
                    r.bytes,
                    r.update_norm,
                    r.cosine,
                    int(r.accepted),
                    r.reason,
                    int(r.aggregated),
                    r.error_code,
                    r.attempt,
                ),
            )

    def add_metrics(self, phase: str, rnd: int, source: str, values: dict[str, float]) -> None:
        with self._db() as db:
            db.executemany(
                "INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?)",
                [(self.run_name, phase, rnd, source, k, float(v)) for k, v in values.items()],
            )

    def add_checkpoint(self, phase: str, rnd: int, path: Path) -> None:
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?)",
                (self.run_name, phase, rnd, str(path), time.time()),
            )

    def event(self, kind: str, message: str, level: str = "info") -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                (self.run_name, time.time(), level, kind, message),
            )

    def forget_after(self, phase: str, rnd: int) -> None:
        """On resume: drop what rounds after the checkpoint recorded (the resumed run records them again)."""
        later = ("finetune",) if phase == "pretrain" else ()
        with self._db() as db:
            for table in ("rounds", "replies", "metrics", "checkpoints"):
                db.execute(
                    f"DELETE FROM {table} WHERE run_name = ? AND ((phase = ? AND round > ?) OR phase IN "
                    f"({','.join('?' * len(later)) or 'NULL'}))",
                    (self.run_name, phase, rnd, *later),
                )


class StoreReader:
    """A run store, read-only: SQLite's `mode=ro`, so a live run's writes are never blocked and nothing is
    ever created or changed; a store whose tables do not exist yet (a run starting this instant) reads
    empty. Rows come as dicts, replies with their metrics decoded, in the order people read them."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise StoreError(f"{path}: no run store here; is this a federated run folder?")
        self.path = path

    def run(self) -> dict[str, Any] | None:
        """The store's run: name, uid, Flower run, times, status, scenario, strategy, config (JSON)."""
        found = self._rows("SELECT * FROM runs")
        return found[0] if found else None

    def rounds(self, phase: str | None = None, *, finished: bool = False) -> list[dict[str, Any]]:
        """Rounds of both phases (pretraining first), or of one; only those that finished, if asked."""
        where = " AND finished IS NOT NULL" if finished else ""
        return self._rows(
            f"SELECT * FROM rounds WHERE phase LIKE ?{where} ORDER BY phase DESC, round", (phase or "%",)
        )

    def replies(self, phase: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """Every site's reply (or its absence's record), `metrics` as a dict."""
        rows = self._rows(
            "SELECT * FROM replies WHERE phase LIKE ? AND kind LIKE ? "
            "ORDER BY phase DESC, round, site, attempt",
            (phase or "%", kind or "%"),
        )
        for row in rows:
            try:
                row["metrics"] = json.loads(row["metrics"] or "{}")
            except json.JSONDecodeError as exc:
                why = f"a reply's metrics are not JSON ({exc})"
                raise StoreError(f"{self.path}: {why}; restore it from a backup") from None
        return rows

    def metrics(self, phase: str | None = None, source: str | None = None) -> list[dict[str, Any]]:
        """Global metrics, one row per (phase, round, source, key)."""
        return self._rows(
            "SELECT phase, round, source, key, value FROM metrics WHERE phase LIKE ? AND source LIKE ? "
            "ORDER BY phase DESC, round",
            (phase or "%", source or "%"),
        )

    def sites(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM sites ORDER BY site")

    def events(self) -> list[dict[str, Any]]:
        return self._rows("SELECT time, level, kind, message FROM events ORDER BY time")

    def _rows(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        with _damage_named(self.path):
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
            db.row_factory = sqlite3.Row
            try:
                return [dict(r) for r in db.execute(sql, params).fetchall()]
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []  # the run is creating its store this instant
                raise
            finally:
                db.close()


@contextmanager
def _damage_named(path: Path) -> Iterator[None]:
    """A file that is not a readable SQLite store becomes one line naming it (a lock or busy timeout stays
    what it is: an operational error of a working store)."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError) and any(w in str(exc) for w in ("locked", "busy")):
            raise
        raise StoreError(f"{path}: not a readable run store ({exc}); restore it from a backup") from None
