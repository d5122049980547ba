"""`make bench`: the project's numbers, as ratios measured in one run (these machines are noisy).

    python -m tests.bench                  # everything (about 30-40 minutes on 2 CPU cores)
    python -m tests.bench data spark       # some groups: data, spark, federation, deployment, privacy, scale

Results go to runs/bench/results.json (a group run alone replaces only its own entry) and a table on stdout.
Nothing here is asserted: targets are printed beside the figures. A group that fails or times out records
why (and, where it can, how far it got) and the others still run.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

from tests.bench import data, deployment, federation, privacy, scale, spark

GROUPS = {
    "data": data.run,
    "spark": spark.run,
    "federation": federation.run,
    "deployment": deployment.run,
    "privacy": privacy.run,
    "scale": scale.run,
}
OUT = Path("runs/bench")


def main(argv: list[str]) -> None:
    chosen = argv or list(GROUPS)
    unknown = [g for g in chosen if g not in GROUPS]
    if unknown:
        sys.exit(f"unknown benchmark group(s) {unknown}; choose from {list(GROUPS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    store = OUT / "results.json"
    earlier = json.loads(store.read_text()) if store.exists() else {}  # groups not rerun keep their figures
    results: dict[str, dict] = {
        **earlier,
        "machine": {
            "cpus": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
        },
    }
    for name in chosen:
        started = time.perf_counter()
        try:
            results[name] = GROUPS[name](OUT / name)
        except Exception as error:  # one group's failure must not cost the others' figures
            first = (str(error).strip().splitlines() or [""])[0][:300]
            results[name] = {"failed": f"{type(error).__name__}: {first}"}
        results[name]["bench_seconds"] = round(time.perf_counter() - started, 1)
        store.write_text(json.dumps(results, indent=2))
    print(_table(results))


def _table(results: dict) -> str:
    lines = ["| group | measure | value | target |", "|---|---|---|---|"]
    for group, values in results.items():
        if group == "machine":
            continue
        for key, value in values.items():
            if key.endswith("_target"):
                continue
            target = values.get(f"{key}_target", "")
            shown = f"{value:.3g}" if isinstance(value, float) else value
            lines.append(f"| {group} | {key} | {shown} | {target} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
