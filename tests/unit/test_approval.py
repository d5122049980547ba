"""A site's allow-list of app versions: the hash of an app folder is the hash of the bundle `flwr run`
sends (Flower's FAB hash), approvals are kept in the site's state, and a bad target is one line."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from client.approval import Approvals, app_hash
from shared.operations.daemon import APP_ROOT
from tests.conftest import FEDRETINA


def test_an_app_is_known_by_its_bundles_hash_as_folder_file_or_hash(tmp_path: Path) -> None:
    bundle = build_fab_from_disk(APP_ROOT)
    digest = hashlib.sha256(bundle).hexdigest()
    fab = tmp_path / "app.fab"
    fab.write_bytes(bundle)
    assert app_hash(str(APP_ROOT)) == app_hash(str(fab)) == app_hash(digest.upper()) == digest


def test_approvals_are_kept_in_the_sites_state_and_clear_the_pending_bundle(tmp_path: Path) -> None:
    approvals = Approvals(tmp_path / "state")
    digest = "ab" * 32
    pending = approvals.keep_pending(digest, b"a refused bundle")
    assert approvals.pending() == [digest] and not approvals.allows(digest)
    assert approvals.approve(digest, "release 1.2") and not approvals.approve(digest, "again")
    assert approvals.allows(digest) and "release 1.2" in approvals.approved()[digest]
    assert not pending.exists() and approvals.pending() == []


def test_approving_something_that_is_no_app_is_one_line(tiny_sites: dict[str, Path]) -> None:
    done = subprocess.run(
        [FEDRETINA, "site", "approve", str(tiny_sites["mmac"]), "no-such-app"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "fedretina: error: no-such-app: not an app folder, a .fab file or a 64-digit app hash"
    ]
