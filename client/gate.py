"""The site's side of the process boundary: every ClientApp process its SuperNode starts begins here.

The SuperNode's SuperExec starts `flwr-clientapp` from PATH for each message, and the site daemon puts
this gate first on that PATH (`<state>/daemon/bin/flwr-clientapp`). It is Flower's own ClientApp runner
with one step added: before the bundle the server sent is installed (and so before any of its code can be
imported), its hash is checked against the site's allow-list (`client/approval.py`). An app not on the list
never runs: the site log names its hash, the bundle is kept for review, and the server receives an error
reply saying why. The gate is code installed at the site, so the pushed app cannot skip it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import flwr.supernode.runtime.run_clientapp as runner
from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

from client.approval import Approvals

STATE_ENV = "FEDRETINA_SITE_STATE"  # the site's state folder, set by the daemon


class AppNotApproved(Exception):
    """The server pushed an app version this site has not approved."""


def main() -> None:
    state = os.environ.get(STATE_ENV)
    if not state:
        sys.exit(f"fedretina: error: {STATE_ENV} is not set; start ClientApps through `fedretina site serve`")
    approvals = Approvals(Path(state))
    install = runner.install_from_fab

    def install_if_approved(content: bytes, *args: object, **kwargs: object) -> object:
        digest = hashlib.sha256(content).hexdigest()
        if not approvals.allows(digest):
            kept = approvals.keep_pending(digest, content)
            print(f"fedretina: refused app {digest}: not approved here; review {kept}", file=sys.stderr)
            raise AppNotApproved(
                f"app {digest} is not approved at this site: its operator reviews it, then runs "
                "`fedretina site approve`"
            )
        return install(content, *args, **kwargs)

    runner.install_from_fab = install_if_approved
    flwr_clientapp()
