"""Which app versions a site lets run: an allow-list of app hashes in the site's state folder.

An app is the bundle (Flower's FAB) a server pushes with a run; its hash is Flower's FAB hash, the sha256
of the bundle's bytes. Bundles are built with a fixed file date, so the hash of a reviewed copy of the
app's folder is the hash of what the server sends. The gate (`client/gate.py`) reads the list before
each ClientApp starts, so an approval needs no daemon restart; a refused bundle is kept under `pending/`
for review.

    <state>/apps/approved.txt        one line per approved app: hash, date, what was approved
    <state>/apps/pending/<hash>.fab  bundles refused so far (review them, then approve or delete)
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError
from shared.rundir import atomic_write_bytes, atomic_write_text

HASH = re.compile(r"[0-9a-f]{64}")


def app_hash(target: str) -> str:
    """The hash of an app given as its folder (the bundle is built as `flwr run` builds it), a .fab file
    or the hash itself (64 hex digits, as the site log and `fedretina site approvals` show it)."""
    if HASH.fullmatch(target.lower()):
        return target.lower()
    path = Path(target)
    if path.is_dir():
        from flwr.cli.build import build_fab_from_disk

        return hashlib.sha256(build_fab_from_disk(path.resolve())).hexdigest()
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    raise ConfigError(f"{target}: not an app folder, a .fab file or a 64-digit app hash")


@dataclass(frozen=True)
class Approvals:
    state_root: Path

    @property
    def folder(self) -> Path:
        return self.state_root / "apps"

    @property
    def listing(self) -> Path:
        return self.folder / "approved.txt"

    def approved(self) -> dict[str, str]:
        """Approved hash -> the line recorded with it (date and source)."""
        if not self.listing.exists():
            return {}
        lines = (line.split(maxsplit=1) for line in self.listing.read_text().splitlines() if line.strip())
        return {parts[0]: parts[1] if len(parts) > 1 else "" for parts in lines}

    def pending(self) -> list[str]:
        return sorted(p.stem for p in (self.folder / "pending").glob("*.fab"))

    def allows(self, digest: str) -> bool:
        return digest in self.approved()

    def approve(self, digest: str, source: str) -> bool:
        """Add `digest` (False when it was already approved); its pending bundle, if any, is removed."""
        approved = self.approved()
        if digest in approved:
            return False
        approved[digest] = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {source}"
        atomic_write_text(self.listing, "".join(f"{h} {note}\n" for h, note in approved.items()))
        (self.folder / "pending" / f"{digest}.fab").unlink(missing_ok=True)
        return True

    def keep_pending(self, digest: str, bundle: bytes) -> Path:
        path = self.folder / "pending" / f"{digest}.fab"
        if not path.exists():
            atomic_write_bytes(path, bundle)
        return path
