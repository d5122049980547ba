"""The ServerApp: read the run config, run both phases (see server/run.py).

Bad input (a `UserError`: missing scenario, settings that do not match the run being resumed, too few
sites) stops the run as failed with one log line naming the fix, not a traceback. The console (what
`flwr run --stream` shows) gets one line per round; the run's log.txt gets every detail.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.app.exception import AppExitException
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.exit import ExitCode

from server.run import FederatedRun
from shared.config import from_run_config
from shared.errors import UserError
from shared.logs import console_shows, setup_logging
from shared.rundir import private_files

app = ServerApp()


class RunRefused(AppExitException):
    """A `UserError` on its way out through Flower, which then marks the run failed."""

    exit_code = ExitCode.SERVERAPP_EXCEPTION


class _OneLine(logging.Filter):
    """Flower logs a failing ServerApp with its traceback; ours are bad input, so one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, RunRefused):
            record.msg, record.args, record.exc_info = "fedretina: error: %s", (error,), None
        return True


@app.main()
def main(grid: Grid, context: Context) -> None:
    private_files()
    setup_logging(0)
    console_shows("server.run", "server.directory")
    flower = logging.getLogger("flwr")
    flower.propagate = False  # Flower's logger has its own handler: no duplicate lines
    if not any(isinstance(f, _OneLine) for f in flower.filters):
        flower.addFilter(_OneLine())
    try:
        cfg, options = from_run_config(context.run_config)
        FederatedRun(grid, cfg, options, context).execute()
    except UserError as exc:
        raise RunRefused(str(exc)) from None
