"""A deployed run whose sites reach the server over a slow link (2 MiB/s each way, shared by both sites:
`tests/integration/slow_link.py`), with the cpu profile's model (7.9 MB per pretraining reply): every round
completes with the default timeouts, and the link, not the training, sets the round's pace. The measured
times and bytes are what docs/deployment.md's slow-link paragraph quotes (`make test-faults` prints them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.deployment import deployed, ok

pytestmark = [pytest.mark.integration, pytest.mark.faults]
RATE = 2 << 20  # bytes/s each way


def test_a_cpu_profile_round_completes_over_a_slow_link(tmp_path: Path, tiny_sites: dict[str, Path]) -> None:
    sites = {n: tiny_sites[n] for n in ("eyepacs", "mmac")}
    with deployed(tmp_path, sites, link_rate=RATE) as fed:
        assert fed.slow is not None
        ok(fed.run("slow", profile="cpu", rounds_pretrain=1, rounds_finetune=1, local_steps=1, min_sites=2))
        rounds = fed.store("slow", "SELECT phase, finished - started, status FROM rounds ORDER BY phase DESC")
        replies = fed.store(
            "slow", "SELECT phase, bytes FROM replies WHERE kind = 'train' ORDER BY phase DESC"
        )
        up, down = fed.slow["up"].carried, fed.slow["down"].carried
    assert [(phase, status) for phase, _, status in rounds] == [("pretrain", "ok"), ("finetune", "ok")]
    pretrain = [b for phase, b in replies if phase == "pretrain"]
    assert len(pretrain) == 2 and all(7_000_000 < b < 9_000_000 for b in pretrain)  # the cpu model
    assert up >= sum(b for _, b in replies) and down >= up  # every reply crossed the link; the model too
    seconds = dict((phase, s) for phase, s, _ in rounds)
    assert seconds["pretrain"] >= sum(pretrain) / RATE  # the two replies shared the uplink
    print(
        f"\nslow link {RATE / 2**20:.0f} MiB/s each way: pretrain round {seconds['pretrain']:.1f} s, "
        f"finetune round {seconds['finetune']:.1f} s; carried up {up / 1e6:.1f} MB, down {down / 1e6:.1f} MB"
    )
