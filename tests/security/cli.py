"""The `fedretina` entry point run in this process, for the adversarial suite's many small commands (a
subprocess each would spend seconds importing torch): its exit code and what it wrote to stderr."""

from __future__ import annotations

import logging

import pytest

from shared.cli_common import run_cli
from simulation.cli import app

ERROR = "fedretina: error: "


def fedretina(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run `fedretina ARGS` as the console script does: (exit code, stderr). An uncaught exception (our
    bug: a traceback) propagates and fails the test."""
    code, _, err = fedretina_output(args, capsys)
    return code, err


def fedretina_output(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`fedretina` above, with what the command printed: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as ended:
            run_cli(app, args=args)
    finally:  # the command's console handler writes to this test's captured stderr, closed after it
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "fedretina_console", False)]:
            root.removeHandler(handler)
    code = ended.value.code if isinstance(ended.value.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(err: str) -> str:
    """The one `fedretina: error:` line of `err` (asserting there is exactly one, and no traceback)."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1, err
    return errors[0][len(ERROR) :]
