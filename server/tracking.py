"""A federated run mirrored into MLflow, where research groups already compare their experiments.

The run store stays the record; MLflow gets a copy, from the server only (sites send nothing new):

- parameters: the run's resolved config, flattened (`federation.strategy`, `finetune.lr`, ...);
- per-round metrics, step = round: the global ones as `<phase>/<source>/<key>` (e.g. `finetune/global/
  dr_kappa`, `pretrain/server-probe/probe-loss`) and each site's as `<phase>/<site>/<kind>/<key>`;
- the final test (each site's scores of the final model on its own held-out patients) as
  `test/<site>/<task>-<key>` and the image-weighted `test/all/...`; the cross-site table (each site's
  local model scored by every site) as `cross/<model>/<site>/<task>-<key>`; and summary.md;
- the exported model (model.safetensors, encoder.safetensors) once the run wrote it; the run's status.

`sync` is one pass that adds what MLflow lacks (the rounds finished since the last pass, kept in
`mlflow.json` beside the store): the live run calls it after every round and at its end, and `fedretina
export mlflow runs/<run>` calls it for a run already finished. A tracking server that is down never ends a
federated run: the live pass logs a warning, and the next pass (or the export) catches up.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.report import MEAN, cross_site_rows, final_test_rows
from server.store import StoreReader
from shared.errors import ConfigError
from shared.rundir import atomic_write_text

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)
STATE = "mlflow.json"  # beside store.sqlite: per tracking URI, the MLflow run it mirrors to and what it holds
BATCH = 500  # metrics per log_batch call (MLflow's limit is 1,000)
PARAM_CHARS = 500
ARTIFACTS = ("summary.md", "model.safetensors", "encoder.safetensors")


def tracking_uri(uri: str, runs_dir: Path) -> str:
    """`tracking.mlflow_uri` as MLflow reads it: a bare path is a SQLite database under `runs_dir`."""
    if "://" in uri or uri.startswith("sqlite:"):
        return uri
    return f"sqlite:///{(runs_dir / uri).resolve()}"


def sync(run: Path, uri: str, experiment: str = "fedretina") -> str:
    """Add to MLflow whatever of the run in folder `run` (its store.sqlite) it does not hold yet; returns
    the MLflow run id (the same one on every pass)."""
    require_mlflow()
    from mlflow.entities import Metric, Param, RunStatus
    from mlflow.tracking import MlflowClient

    reader = StoreReader(run / "store.sqlite")
    info = reader.run()
    if info is None:
        raise ConfigError(f"{run}: no federated run in its store.sqlite")
    state_path = run / STATE
    mirrors = json.loads(state_path.read_text()) if state_path.exists() else {}  # per tracking URI
    state = mirrors.get(uri, {})
    client = MlflowClient(tracking_uri=uri)
    if not state.get("run_id"):
        state = {"run_id": _new_run(client, uri, experiment, info["run_name"]), "rounds": []}
        config = json.loads(info["config"]) if isinstance(info["config"], str) else info["config"]
        params = [Param(k, v) for k, v in _flat(config)]
        for i in range(0, len(params), 100):
            client.log_batch(state["run_id"], params=params[i : i + 100])
        client.set_tag(state["run_id"], "fedretina.scenario", str(info["scenario"]))
        client.set_tag(state["run_id"], "fedretina.strategy", str(info["strategy"]))
    run_id, done = state["run_id"], {tuple(r) for r in state["rounds"]}
    new = [
        (r["phase"], r["round"]) for r in reader.rounds(finished=True) if (r["phase"], r["round"]) not in done
    ]
    metrics = [Metric(k, v, _stamp(info), step) for k, v, step in _round_metrics(reader, set(new))]
    finished = info["status"] in ("completed", "failed")
    if finished and not state.get("final"):
        metrics += [Metric(k, v, _stamp(info), 0) for k, v in _test_metrics(reader)]
    for i in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + BATCH])
    state["rounds"] = sorted(done | set(new))
    if finished and not state.get("final"):
        for name in ARTIFACTS:
            if (run / name).exists():
                client.log_artifact(run_id, str(run / name))
        status = RunStatus.FINISHED if info["status"] == "completed" else RunStatus.FAILED
        client.set_terminated(run_id, RunStatus.to_string(status))
        state["final"] = True
    atomic_write_text(state_path, json.dumps(mirrors | {uri: state}))
    return run_id


def require_mlflow() -> None:
    """MLflow is an optional extra: say how to install it rather than fail on an import."""
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            "tracking.mlflow_uri: MLflow is not installed here; install the extra: uv sync --extra mlflow"
        )


def _new_run(client: MlflowClient, uri: str, experiment: str, name: str) -> str:
    """A new MLflow run in `experiment` (made when missing; a SQLite store keeps its artifacts beside the
    database, not in the working directory)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = found.experiment_id
    return client.create_run(experiment_id, run_name=name).info.run_id


def _round_metrics(reader: StoreReader, rounds: set[tuple[str, int]]) -> Iterator[tuple[str, float, int]]:
    """(key, value, step) of every global metric and site reply of `rounds`."""
    for m in reader.metrics():
        if (m["phase"], m["round"]) in rounds and _finite(m["value"]):
            yield f"{m['phase']}/{m['source']}/{m['key']}", float(m["value"]), m["round"]
    for r in reader.replies():
        if (r["phase"], r["round"]) not in rounds or r["kind"] not in ("train", "evaluate"):
            continue
        for key, value in r["metrics"].items():
            if _finite(value):
                yield f"{r['phase']}/{r['site']}/{r['kind']}/{key}", float(value), r["round"]


def _test_metrics(reader: StoreReader) -> Iterator[tuple[str, float]]:
    """The final test: each site's scores per task and their image-weighted mean (`server/report.py`'s
    rows), as `test/<site>/<task>-<metric>` (the mean's site is `all`)."""
    for row in final_test_rows(reader):
        site = "all" if row["site"] == MEAN else row["site"]
        for key, value in row.items():
            if key not in ("site", "task") and _finite(value):
                yield f"test/{site}/{row['task']}-{key}", float(value)
    for row in cross_site_rows(reader):  # the cross-site table: cross/<model>/<scoring site>/<task>-<metric>
        for key, value in row.items():
            if key not in ("model", "site", "task") and _finite(value):
                yield f"cross/{row['model']}/{row['site']}/{row['task']}-{key}", float(value)


def _flat(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _flat(value, f"{name}.")
        else:
            yield name, json.dumps(value)[:PARAM_CHARS] if not isinstance(value, str) else value[:PARAM_CHARS]


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _stamp(info: Mapping[str, Any]) -> int:
    """Milliseconds for MLflow's metric timestamps: the run's start (rounds are told apart by step)."""
    return int(1000 * (info.get("started") or time.time()))


class LiveTracking:
    """The running server's mirror: a pass after every round and one at the end. MLflow missing is refused
    before the run starts; a tracking server that fails mid-run is a warning, and the run goes on."""

    def __init__(self, uri: str, experiment: str, runs_dir: Path, run: Path) -> None:
        self.uri = tracking_uri(uri, runs_dir) if uri else ""
        self.experiment, self.run = experiment, run
        if self.uri:
            require_mlflow()

    def __call__(self) -> None:
        if not self.uri:
            return
        try:
            sync(self.run, self.uri, self.experiment)
        except Exception as exc:  # the tracking server is someone else's: it never ends the run
            log.warning(
                "MLflow (%s): %s: %s; the run goes on, `fedretina export mlflow %s` catches up",
                self.uri,
                type(exc).__name__,
                exc,
                self.run.parent,
            )
