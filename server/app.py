"""The ServerApp: read the run config, run both phases (see server/run.py)."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.run import FederatedRun
from shared.config import from_run_config
from shared.logs import setup_logging

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging(0)
    logging.getLogger("flwr").propagate = False  # Flower's logger has its own handler: no duplicate lines
    cfg, options = from_run_config(context.run_config)
    FederatedRun(grid, cfg, options, context.run_id).execute()
