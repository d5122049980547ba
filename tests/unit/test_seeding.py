from __future__ import annotations

import subprocess
import sys

from shared.seeding import derive_seed


def test_derived_seeds_are_stable_across_processes_and_distinct_per_key() -> None:
    here = derive_seed(7, "pretrain", 3, "eyepacs")
    code = "from shared.seeding import derive_seed; print(derive_seed(7, 'pretrain', 3, 'eyepacs'))"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(there.stdout) == here
    seeds = {derive_seed(7, "pretrain", r, s) for r in range(20) for s in ("a", "b", "c")}
    assert len(seeds) == 60
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(8, "pretrain", 3, "eyepacs") != here
