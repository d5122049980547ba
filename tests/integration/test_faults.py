"""Faults in a real deployment on localhost (the deployment tests' harness: TLS, node authentication, two
site daemons), each ending with the run completed, the store telling what happened in order, and the final
weights equal to a replay of the replies the store marks as aggregated:

- a site SIGKILLed mid-round: the round completes with the other site, the dead one is recorded with
  Flower's NODE_UNAVAILABLE; restarted with the same key it keeps its node id and rejoins the next round;
- a straggler (its ClientApp stopped) past the reply timeout is recorded as timed out;
- a site cut off longer than the heartbeat patience (the whole daemon stopped, then continued) fails that
  round and comes back;
- the SuperLink restarted mid-run: the sites reconnect and the run resumes from its last checkpoint;
- the ServerApp killed mid-run: the run resumes from its last checkpoint.

Minutes each (Flower notices a dead node after two missed 30 s heartbeats): `make test-faults`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from shared.data.site import load_site
from shared.operations.daemon import descendants, running
from simulation.replay import replay
from tests.conftest import FEDRETINA
from tests.integration.deployment import Federation, deployed, fedretina, ok

pytestmark = [pytest.mark.integration, pytest.mark.faults]
SITES = ("eyepacs", "mmac")
# two pretraining rounds (the fault in the first, or the resume after it), threads fixed for the replay,
# optimiser state off so that a straggler's late round leaves nothing the server did not see
RUN = {
    "threads": 1,
    "rounds_pretrain": 2,
    "rounds_finetune": 0,
    "min_sites": 1,
    "keep_optimizer_state": False,
    "connect_deadline_s": 400,
}


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, tiny_sites: dict[str, Path]) -> Iterator[Federation]:
    with deployed(tmp_path_factory.mktemp("faults"), {n: tiny_sites[n] for n in SITES}) as federation:
        yield federation


def start(fed: Federation, name: str, *flags: str, **settings: object) -> subprocess.Popen:
    """`fedretina server run` in the background, its output in <root>/<name>.out."""
    with (fed.root / f"{name}.out").open("a") as out:
        argv = [FEDRETINA, *fed.run_args(name, **(RUN | settings)), *flags]
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


def finish(fed: Federation, name: str, run: subprocess.Popen) -> None:
    code = run.wait(timeout=900)
    assert code == 0, (fed.root / f"{name}.out").read_text()[-4000:]


def rows(fed: Federation, name: str, sql: str) -> list[tuple]:
    """The store's rows, or none while the run has not made its store yet."""
    with contextlib.suppress(sqlite3.OperationalError):
        return fed.store(name, sql)
    return []


def wait_for(what: str, condition: Callable[[], object], timeout: float = 400) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def round_started(fed: Federation, name: str, rnd: int) -> Callable[[], object]:
    return lambda: rows(fed, name, f"SELECT 1 FROM rounds WHERE phase = 'pretrain' AND round = {rnd}")


def daemon(fed: Federation, site: str) -> list[int]:
    """The site daemon's processes: the daemon, its SuperNode, SuperExec and ClientApps (each in a group of
    its own), the whole tree a machine failure would take down."""
    pidfile = load_site(fed.sites[site]).config.state_root / "daemon" / "supernode.pid"
    pid = int(pidfile.read_text())
    return [pid, *descendants(pid)]


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def clientapps(fed: Federation, site: str) -> list[int]:
    """The site's running ClientApp processes (started through its gate)."""
    gate = str(load_site(fed.sites[site]).config.state_root / "daemon" / "bin" / "flwr-clientapp")
    return [pid for pid, argv in _processes() if gate in argv]


def serverapps(fed: Federation) -> list[int]:
    return [pid for pid, argv in _processes() if "flwr-serverapp" in argv and f":{fed.link}" in argv]


def _processes() -> Iterator[tuple[int, str]]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                yield int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()


def failure(fed: Federation, name: str, site: str, rnd: int) -> Callable[[], list[tuple]]:
    sql = (
        "SELECT error_code, reason FROM replies WHERE kind = 'train' AND accepted = 0 "
        f"AND site = '{site}' AND round = {rnd}"
    )
    return lambda: rows(fed, name, sql)


def rounds(fed: Federation, name: str) -> list[tuple]:
    return fed.store(name, "SELECT round, sampled, accepted, status FROM rounds ORDER BY round")


def events(fed: Federation, name: str) -> list[str]:
    return [kind for (kind,) in fed.store(name, "SELECT kind FROM events ORDER BY time")]


def assert_replay_equal(fed: Federation, name: str) -> None:
    """The store is an exact account of the run: replaying its aggregated replies gives its weights."""
    federation = fed.state / "runs" / name / "federation"
    replayed = replay(federation, list(fed.sites.values()))
    assert replayed, "nothing to replay"
    for phase, (weights, final) in replayed.items():
        assert weights.keys() == final.keys(), phase
        assert all(np.array_equal(weights[k], final[k]) for k in final), phase


def test_a_killed_site_fails_its_round_then_rejoins_with_its_node_id(fed: Federation) -> None:
    run = start(fed, "killed", reply_timeout_s=400)
    wait_for("round 1", round_started(fed, "killed", 1))
    wait_for("eyepacs training", lambda: clientapps(fed, "eyepacs"))
    signal_all(daemon(fed, "eyepacs"), signal.SIGKILL)
    ((code, reason),) = wait_for("eyepacs's failure", failure(fed, "killed", "eyepacs", 1))
    fed.serve("eyepacs")  # the same key
    finish(fed, "killed", run)
    assert code == 5 and "NODE_UNAVAILABLE" in reason, reason
    assert rounds(fed, "killed") == [(1, 2, 1, "ok"), (2, 2, 2, "ok")]  # back at the next round
    joined = dict(fed.store("killed", "SELECT site, node_id FROM sites"))
    assert int(joined["eyepacs"]) == fed.nodes["eyepacs"]
    assert events(fed, "killed") == ["start", "reply-failed"]
    assert_replay_equal(fed, "killed")


def test_a_straggler_past_the_reply_timeout_is_recorded_as_timed_out(fed: Federation) -> None:
    run = start(fed, "straggler", reply_timeout_s=100)
    wait_for("round 1", round_started(fed, "straggler", 1))
    # every ClientApp the site starts hangs (Flower starts the task again when one stops answering)
    stopped: set[int] = set()
    timed_out = failure(fed, "straggler", "eyepacs", 1)

    def hang_new_clientapps() -> list[tuple]:
        new = set(clientapps(fed, "eyepacs")) - stopped
        signal_all(sorted(new), signal.SIGSTOP)
        stopped.update(new)
        return timed_out()

    try:
        ((code, reason),) = wait_for("eyepacs's timeout", hang_new_clientapps)
    finally:
        signal_all(sorted(stopped), signal.SIGCONT)
    finish(fed, "straggler", run)
    assert code is None and reason == "timed out: no reply within 100 s", (code, reason)
    assert rounds(fed, "straggler") == [(1, 2, 1, "ok"), (2, 2, 2, "ok")]
    assert_replay_equal(fed, "straggler")


def test_a_site_cut_off_past_the_heartbeat_patience_fails_its_round_and_comes_back(fed: Federation) -> None:
    run = start(fed, "cut", reply_timeout_s=400)
    wait_for("round 1", round_started(fed, "cut", 1))
    wait_for("eyepacs training", lambda: clientapps(fed, "eyepacs"))
    processes = daemon(fed, "eyepacs")
    signal_all(processes, signal.SIGSTOP)
    try:
        ((code, reason),) = wait_for("eyepacs's failure", failure(fed, "cut", "eyepacs", 1))
    finally:
        signal_all(processes, signal.SIGCONT)
    finish(fed, "cut", run)
    assert code == 5 and "NODE_UNAVAILABLE" in reason, reason
    assert rounds(fed, "cut") == [(1, 2, 1, "ok"), (2, 2, 2, "ok")]
    assert_replay_equal(fed, "cut")


def resume_to_the_end(fed: Federation, name: str) -> None:
    """`server run --resume` completes the run after its round-1 checkpoint, as an exact account."""
    finish(fed, name, start(fed, name, "--resume"))
    assert rounds(fed, name) == [(1, 2, 2, "ok"), (2, 2, 2, "ok")]
    starts = fed.store(name, "SELECT message FROM events WHERE kind = 'start' ORDER BY time")
    assert len(starts) == 2 and "resumed after pretrain round 1" in starts[1][0], starts
    assert_replay_equal(fed, name)


def test_the_superlink_restarted_mid_run_and_the_run_resumed(fed: Federation) -> None:
    run = start(fed, "relink")
    wait_for("round 2", round_started(fed, "relink", 2))
    ok(fedretina("server", "stop", "--state", str(fed.state)))
    assert run.wait(timeout=300) != 0
    fed.start_server()  # its state on disk: the sites' registrations survive
    resume_to_the_end(fed, "relink")


def test_a_killed_serverapp_resumes_from_its_last_checkpoint(fed: Federation) -> None:
    run = start(fed, "killed-server")
    wait_for("round 2", round_started(fed, "killed-server", 2))
    signal_all(wait_for("the ServerApp", lambda: serverapps(fed)), signal.SIGKILL)
    assert run.wait(timeout=400) != 0
    resume_to_the_end(fed, "killed-server")


@pytest.mark.security
def test_a_site_restarted_right_after_a_crash_joins_once_the_server_lets_it(fed: Federation) -> None:
    """A crashed site's last session stays online at the SuperLink for two heartbeats: a restart at once is
    refused ("Failed to activate SuperNode"). `site serve` keeps the node trying through that window and says
    it is served only once it joined; its daemon then runs on (before, `serve` said "served" at once and
    the daemon died a few seconds later, refused)."""
    folder = load_site(fed.sites["eyepacs"]).config.state_root / "daemon"
    log = folder / "supernode.log"
    signal_all(daemon(fed, "eyepacs"), signal.SIGKILL)
    offset = log.stat().st_size
    fed.serve("eyepacs")
    time.sleep(15)  # a refused node's daemon would have ended by now
    assert running(folder / "supernode.pid") is not None, (
        "the site daemon ended after serve said it was served"
    )
    since = log.read_bytes()[offset:].decode(errors="replace")
    assert "Failed to activate SuperNode" in since, since[-2000:]  # it was refused at first ...
    assert "SuperNode ID:" in since.rsplit("Failed to activate SuperNode", 1)[1]  # ... then activated
