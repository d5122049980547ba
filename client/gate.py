"""The site's side of the process boundary: every ClientApp process its SuperNode starts begins here.

The SuperNode's SuperExec starts `flwr-clientapp` from PATH for each message, and the site daemon puts
this gate first on that PATH (`<state>/daemon/bin/flwr-clientapp`). It is Flower's own ClientApp runner
with its install and load steps replaced, so that what runs is the approved bundle and only it:

1. Before the bundle the server sent is installed (and so before any of its code can be imported), its
   hash is checked against the site's allow-list (`client/approval.py`). An app not on the list never
   runs: the site log names its hash, the bundle is kept for review, and the server receives an error
   reply saying why.
2. An approved bundle is installed from those very bytes into the site's own folder, named by its full
   hash (`<state>/apps/installed/<hash>/`), never into a folder named from the run's metadata, which the
   server chooses.
3. The gate itself is code installed at the site (this package): before the bundle's ClientApp is loaded,
   every module of the site's installed copy is forgotten, and `client`, `shared`, `server` and
   `simulation` are imported from the approved folder only (a finder first on `sys.meta_path`), so a
   module the bundle lacks fails to import instead of quietly coming from the site's copy, however the
   site installed fedretina (editable or not).
The pushed app cannot skip the gate: the gate runs first, from the site's own installation.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path

import flwr.supernode.runtime.run_clientapp as runner
from flwr.cli.install import install_from_fab
from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

from client.approval import Approvals
from shared.rundir import private_files

STATE_ENV = "FEDRETINA_SITE_STATE"  # the site's state folder, set by the daemon
OUR_PACKAGES = ("client", "shared", "server", "simulation")


class AppNotApproved(Exception):
    """The server pushed an app version this site has not approved."""


def main() -> None:
    private_files()
    state = os.environ.get(STATE_ENV)
    if not state:
        sys.exit(f"fedretina: error: {STATE_ENV} is not set; start ClientApps through `fedretina site serve`")
    approvals = Approvals(Path(state))
    installed: list[Path] = []
    load = runner.get_load_client_app_fn

    def install_if_approved(content: bytes, *_: object, **__: object) -> Path:
        digest = hashlib.sha256(content).hexdigest()
        if not approvals.allows(digest):
            kept = approvals.keep_pending(digest, content)
            print(f"fedretina: refused app {digest}: not approved here; review {kept}", file=sys.stderr)
            raise AppNotApproved(
                f"app {digest} is not approved at this site: its operator reviews it, then runs "
                "`fedretina site approve`"
            )
        installed.append(install_approved(approvals.folder / "installed", digest, content))
        import_only_from(installed[-1])
        return installed[-1]

    def load_approved(default_app_ref: str, app_path: str | None, multi_app: bool) -> Callable:
        if not installed:
            raise AppNotApproved("no approved app was installed for this message")
        return load(default_app_ref, str(installed[-1]), multi_app)  # checks the run's app id and version

    runner.install_from_fab = install_if_approved
    runner.get_load_client_app_fn = load_approved
    flwr_clientapp()


def install_approved(root: Path, digest: str, content: bytes) -> Path:
    """The app folder of approved bundle `content` (hash `digest`): made once from these bytes under
    `root/<digest>/` (unpacked beside it, then renamed into place, so a crash leaves no half-made app)."""
    final = root / digest
    if not final.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=root, prefix=f".{digest[:12]}-"))
        try:
            app = install_from_fab(content, install_dir=scratch, skip_prompt=True)
            os.replace(app, scratch / "app")
            try:
                os.rename(scratch / "app", final)
            except OSError:
                if not final.is_dir():  # another message's process installed it first: theirs is the same
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return final


def import_only_from(app: Path) -> None:
    """Forget the site's installed copy of our packages in this process, and import them from `app` only."""
    for name in list(sys.modules):
        if name.split(".", 1)[0] in OUR_PACKAGES:
            del sys.modules[name]
    sys.meta_path.insert(0, _OnlyFrom(app))


class _OnlyFrom(importlib.abc.MetaPathFinder):
    """Our top-level packages from one folder and nowhere else (their submodules then come from the
    packages' own folders, Python's rule)."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if "." in fullname or fullname not in OUR_PACKAGES:
            return None
        spec = PathFinder.find_spec(fullname, [self.folder])
        if spec is None:
            raise ModuleNotFoundError(f"{fullname} is not in the approved app {self.folder}", name=fullname)
        return spec
