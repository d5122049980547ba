"""`fedretina server summary`: the run's table, status and outputs; its exit code says whether the run
completed (`flwr run` exits 0 whatever became of the run, so `make demo` relies on this), and `--no-table`
leaves out the table the run printed as it ended."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.dashboard_store import record_round, start
from tests.security.cli import fedretina_output


@pytest.mark.parametrize(("status", "code"), [("completed", 0), ("failed", 1)])
def test_the_summary_exits_0_only_for_a_completed_run_and_can_leave_the_table_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], status: str, code: int
) -> None:
    store = start(tmp_path, "demo", sites=3, rounds=2)
    for rnd in (1, 2):
        record_round(store, rnd, sites=3)
    store.finish_run(status)
    got, with_table, _ = fedretina_output(["server", "summary", str(tmp_path / "demo")], capsys)
    assert got == code
    got, without, _ = fedretina_output(["server", "summary", "--no-table", str(tmp_path / "demo")], capsys)
    assert got == code and f"run demo: {status}" in without
    table = [line for line in with_table.splitlines() if line.startswith("|")]
    assert table and not [line for line in without.splitlines() if line.startswith("|")]
    assert without.strip() in with_table  # the same lines, less the table
