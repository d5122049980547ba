"""The federation through real Flower processes (`flwr run .`, local SuperLink, Ray actors), tiny profile.

- two virtual sites, 1+1 rounds: both phases complete and everything lands in the run store;
- four virtual sites of which three send bad updates: each is rejected with its reason, and under
  `short_round: wait` a round short of `min_sites` is tried again, then fails the run;
- cyclic weight transfer over five sites, three faulty: the honest ones train in turn, the faulty are
  passed over, and the replay gives the run's weights bitwise;
- one site holding all the data: final weights of both phases equal the CLI's centralised runs bitwise
  (`fedretina pretrain`, then `fedretina finetune` with the hold-out protocol from that encoder), two
  identical runs are bitwise identical, a server killed mid-run resumes to the same weights, and resuming
  with changed rounds is refused in one line naming the key.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from client.evaluate import evaluate_model
from shared.config import load_config
from shared.data.site import load_site
from shared.models import TaskModel, nnmobilenet
from shared.weights import load_weights
from tests.conftest import FEDRETINA, ROOT, write_site
from tests.integration.flower import Flower, assert_completed, faulty_run, iid_scenario, sets, store_rows

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def flower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    fl = Flower(tmp_path_factory.mktemp("flwr-home"), ROOT)
    yield fl
    fl.stop()


def scenario(path: Path, sites: list[Path]) -> Path:
    path.write_text(yaml.safe_dump({"name": path.stem, "sites": [str(s) for s in sites]}))
    return path


def test_two_virtual_sites_run_both_phases_through_flwr_run(
    flower: Flower, tiny_sites: dict[str, Path], tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    plan = scenario(tmp_path / "two.yaml", [tiny_sites["eyepacs"], tiny_sites["mmac"], tiny_sites["aptos"]])
    result = flower.run(
        3,
        {
            "profile": "tiny",
            "scenario": str(plan),
            "run-name": "two",
            "set": sets(
                runs_dir=runs,
                federation__min_sites=1,
                federation__cross_site=True,
                tracking__mlflow_uri="mlflow.db",
            ),
        },
    )
    run = runs / "two"
    assert_completed(result, run, flower.home)
    assert sorted(store_rows(run, "SELECT site FROM sites")) == [("aptos",), ("eyepacs",), ("mmac",)]
    rounds = store_rows(run, "SELECT phase, round, sampled, accepted, status FROM rounds ORDER BY phase DESC")
    assert rounds == [("pretrain", 1, 3, 3, "ok"), ("finetune", 1, 3, 3, "ok")]
    replies = store_rows(
        run,
        "SELECT phase, site, node_id, num_examples, bytes, update_norm, cosine, accepted "
        "FROM replies WHERE kind = 'train'",
    )
    assert len(replies) == 6 and all(r[7] == 1 and r[4] > 0 and r[5] > 0 and -1 <= r[6] <= 1 for r in replies)
    assert all(isinstance(r[2], str) and int(r[2]) > 0 for r in replies)  # uint64 node ids kept as text
    keys = {k for (k,) in store_rows(run, "SELECT key FROM metrics WHERE source = 'federated-eval'")}
    assert {"dr-auc", "mmac-kappa"} <= keys
    assert (
        store_rows(run, "SELECT count(*) FROM metrics WHERE source = 'server-probe'")[0][0] == 2
    )  # rounds 0, 1
    fed = run / "federation"
    assert (fed / "probes" / "pretrain-r0001.png").is_file() and (fed / "summary.md").is_file()
    encoder, meta = load_weights(fed / "encoder.safetensors")
    cfg = load_config(profile="tiny")
    TaskModel(nnmobilenet(cfg.model.width_mult), {"dr": 5}).encoder.load_state_dict(encoder, strict=True)
    model, meta = load_weights(fed / "model.safetensors")
    assert meta["tasks"] == {"dr": 5, "mmac": 5} and "heads.mmac.1.weight" in model
    assert meta["settings"]["federation.rounds_finetune"] == 1
    console = result.stdout + result.stderr
    assert "pretrain round 1/1: 3/3 sites, loss " in console and "finetune round 1/1: 3/3 sites" in console
    assert "Aggregated MetricRecord" not in console  # Flower's raw dumps stay out of the console
    assert "| pretrain | 1 | 3/3 |" in (fed / "summary.md").read_text()
    _the_final_test_is_each_sites_own_scoring(run, tiny_sites)
    _the_cross_site_table_is_each_sites_own_scoring(run, tiny_sites)
    _mlflow_holds_the_stores_numbers(run, runs)


def _the_cross_site_table_is_each_sites_own_scoring(run: Path, tiny_sites: dict[str, Path]) -> None:
    """`federation.cross_site`: every site scored each site's own model of the last round on its test
    patients; each cell equals `fedretina site evaluate`'s scores of that saved model at that site, and the
    summary shows the matrix."""
    local = run / "federation" / "local"
    assert sorted(p.stem for p in local.glob("*.safetensors")) == ["aptos", "eyepacs", "mmac"]
    cells = store_rows(run, "SELECT kind, site, metrics FROM replies WHERE kind LIKE 'cross:%'")
    assert {k for k, _, _ in cells} == {"cross:aptos", "cross:eyepacs", "cross:mmac"}
    assert all(json.loads(m)["dr-num-examples"] == 0 for _, s, m in cells if s != "eyepacs")
    for scorer in ("eyepacs",):  # the one site holding labelled DR test patients (APTOS's are unlabelled)
        for model in ("aptos", "eyepacs", "mmac"):
            (sent,) = [json.loads(m) for k, s, m in cells if k == f"cross:{model}" and s == scorer]
            with one_thread():
                (score,) = evaluate_model(load_site(tiny_sites[scorer]), local / f"{model}.safetensors")
            assert sent["dr-num-examples"] == score.images > 0
            for key, value in score.metrics.items():
                assert sent[f"dr-{key}"] == pytest.approx(value, abs=1e-6, nan_ok=True), (scorer, model, key)
    summary = (run / "federation" / "summary.md").read_text()
    assert "Cross-site dr referable_auc" in summary and "| model | eyepacs |" in summary
    assert "| trained at mmac |" in summary and "| federated |" in summary


def _mlflow_holds_the_stores_numbers(run: Path, runs: Path) -> None:
    """The live server logged the run to MLflow (tracking.mlflow_uri, a SQLite store under runs_dir): read
    back through MLflow's client, its parameters, per-round global and per-site metrics, the final test and
    the model are the store's; `fedretina export mlflow` of the finished run logs the same numbers, and a
    second export adds nothing."""
    from mlflow.tracking import MlflowClient

    live = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    (logged,) = live.search_runs([live.get_experiment_by_name("fedretina").experiment_id])
    assert logged.info.run_name == "two" and logged.info.status == "FINISHED"
    assert logged.data.params["federation.min_sites"] == "1" and logged.data.params["profile"] == "tiny"
    ((auc,),) = store_rows(
        run, "SELECT value FROM metrics WHERE source = 'federated-eval' AND key = 'dr-auc' AND round = 1"
    )
    history = live.get_metric_history(logged.info.run_id, "finetune/federated-eval/dr-auc")
    assert [(m.step, m.value) for m in history] == [(1, pytest.approx(auc))]
    (sent,) = store_rows(run, "SELECT metrics FROM replies WHERE kind = 'test' AND site = 'eyepacs'")
    referable = json.loads(sent[0])["dr-referable_auc"]
    assert logged.data.metrics["test/eyepacs/dr-referable_auc"] == pytest.approx(referable)
    assert "pretrain/mmac/train/train-loss" in logged.data.metrics  # each site's own curve
    (cell,) = store_rows(run, "SELECT metrics FROM replies WHERE kind = 'cross:mmac' AND site = 'eyepacs'")
    logged_cell = logged.data.metrics["cross/mmac/eyepacs/dr-kappa"]
    assert logged_cell == pytest.approx(json.loads(cell[0])["dr-kappa"])
    assert {"model.safetensors", "summary.md"} <= {a.path for a in live.list_artifacts(logged.info.run_id)}
    for _ in range(2):
        cli("export", "mlflow", str(run), "--uri", "exported.db")
    exported = MlflowClient(f"sqlite:///{runs / 'exported.db'}")
    (again,) = exported.search_runs([exported.get_experiment_by_name("fedretina").experiment_id])
    assert again.data.metrics == logged.data.metrics and again.data.params == logged.data.params
    assert len(exported.get_metric_history(again.info.run_id, "finetune/federated-eval/dr-auc")) == 1


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Score as the simulation's sites do (Ray actors train and score on one torch thread): on 4 test
    images a macro AUC moves a whole step when the summation order moves two nearly tied scores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _the_final_test_is_each_sites_own_scoring(run: Path, tiny_sites: dict[str, Path]) -> None:
    """After phase 2 each site scores the final model on its held-out test patients: what it sends equals
    `fedretina site evaluate`'s scores of the exported model at that site, and the summary shows it. The
    MMAC-like site holds no test split: it replies with 0 images and gets no row."""
    tested = dict(store_rows(run, "SELECT site, metrics FROM replies WHERE kind = 'test'"))
    assert sorted(tested) == ["aptos", "eyepacs", "mmac"]
    sent = json.loads(tested["eyepacs"])
    with one_thread():
        (score,) = evaluate_model(load_site(tiny_sites["eyepacs"]), run / "federation" / "model.safetensors")
    assert score.task == "dr" and sent["dr-num-examples"] == score.images > 0
    for key, value in score.metrics.items():
        assert sent[f"dr-{key}"] == pytest.approx(value, abs=1e-6, nan_ok=True), key
    assert json.loads(tested["mmac"])["mmac-num-examples"] == 0
    summary = (run / "federation" / "summary.md").read_text()
    row = f"| eyepacs | dr | {score.images} | {score.metrics['referable_auc']:.4f} |"
    assert "held-out test patients" in summary and row in summary and "| mmac |" not in summary


# ---------------------------------------------------------------------------------------- one site holds all
# One torch thread on both sides: the same floats need the same summation order (Ray actors default to 1).
ROUNDS = {
    "threads": 1,
    "federation__rounds_pretrain": 3,
    "federation__rounds_finetune": 2,
    "federation__local_epochs": 1,
    "federation__min_sites": 1,
}


@pytest.fixture(scope="module")
def single_site(flower: Flower, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three runs of one single-site federation: two uninterrupted, one killed after a round and resumed."""
    root = tmp_path_factory.mktemp("single")
    site = write_site(root, "eyepacs", 40, seed=3, height=96, styles=("eyepacs-mixed-a", "eyepacs-mixed-b"))
    plan = scenario(root / "single.yaml", [site])
    runs = root / "runs"

    def config(name: str, **extra: object) -> dict[str, object]:
        return {
            "profile": "tiny",
            "scenario": str(plan),
            "run-name": name,
            "set": sets(runs_dir=runs, **ROUNDS),
            **extra,
        }

    for name in ("a", "b"):
        result = flower.run(1, config(name))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    first = runs / "killed" / "federation" / "checkpoints" / "pretrain-r0001.safetensors"
    assert flower.run_and_kill(1, config("killed"), first.exists), "the server was not killed mid-run"
    assert not (runs / "killed" / "federation" / "model.safetensors").exists()
    resumed = flower.run(1, config("killed", resume=True))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming after pretrain round" in resumed.stdout + resumed.stderr
    more = config("killed", resume=True) | {
        "set": sets(runs_dir=runs, **ROUNDS | {"federation__rounds_pretrain": 4})
    }
    refused = flower.run(1, more)
    return {"site": site, "runs": runs, "refused": refused.stdout + refused.stderr}


def final(run: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    encoder, _ = load_weights(run / "federation" / "encoder.safetensors")
    model, _ = load_weights(run / "federation" / "model.safetensors")
    return encoder, model


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cli(*args: str) -> None:
    result = subprocess.run([FEDRETINA, "-q", *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


def test_federated_simulation_equals_the_clis_centralised_runs_bitwise(single_site: dict[str, Path]) -> None:
    runs, site = single_site["runs"], str(single_site["site"])
    common = [
        "--profile",
        "tiny",
        "--site",
        site,
        "--name",
        "central",
        "--set",
        "threads=1",
        "--set",
        f"runs_dir={runs}",
    ]
    cli("pretrain", *common, "--set", f"pretrain.epochs={ROUNDS['federation__rounds_pretrain']}")
    exported = runs / "central" / "pretrain" / "encoder.safetensors"
    spark = f"finetune.inits={{spark: {{kind: spark, weights: {exported}}}}}"
    epochs = f"finetune.epochs={ROUNDS['federation__rounds_finetune']}"
    cli("finetune", *common, "--set", "finetune.protocol=holdout", "--set", epochs, "--set", spark)
    encoder, model = final(runs / "a")
    assert same(encoder, load_weights(exported)[0]), "phase 1 differs from `fedretina pretrain`"
    central, meta = load_weights(
        runs / "central" / "finetune" / "checkpoints" / "spark_100pct_fold0.safetensors"
    )
    assert meta["best_epoch"] == ROUNDS["federation__rounds_finetune"]  # the hold-out keeps the last epoch
    assert same(model, central), "phase 2 differs from `fedretina finetune` (hold-out)"


def test_two_identical_simulations_give_bitwise_identical_weights(single_site: dict[str, Path]) -> None:
    a, b = final(single_site["runs"] / "a"), final(single_site["runs"] / "b")
    assert same(a[0], b[0]) and same(a[1], b[1])


def test_a_killed_server_resumes_to_the_uninterrupted_runs_weights(single_site: dict[str, Path]) -> None:
    a, killed = final(single_site["runs"] / "a"), final(single_site["runs"] / "killed")
    assert same(a[0], killed[0]) and same(a[1], killed[1])
    rounds = store_rows(
        single_site["runs"] / "killed", "SELECT phase, round, status FROM rounds ORDER BY phase DESC, round"
    )
    assert rounds == [
        ("pretrain", 1, "ok"),
        ("pretrain", 2, "ok"),
        ("pretrain", 3, "ok"),
        ("finetune", 1, "ok"),
        ("finetune", 2, "ok"),
    ]


def test_resuming_with_changed_rounds_is_refused_in_one_line_naming_the_key(
    single_site: dict[str, Path],
) -> None:
    output = single_site["refused"]
    assert "fedretina: error: " in output and "federation.rounds_pretrain=3 (now 4)" in output, output[-3000:]
    assert "Traceback" not in output
    assert not (
        single_site["runs"] / "killed" / "federation" / "checkpoints" / "pretrain-r0004.safetensors"
    ).exists()


def test_bad_run_config_fails_the_run_with_one_line_naming_the_fix(flower: Flower, tmp_path: Path) -> None:
    result = flower.run(
        1, {"profile": "tiny", "scenario": "no-such-scenario", "set": sets(runs_dir=tmp_path)}
    )
    output = result.stdout + result.stderr
    assert "fedretina: error: scenario 'no-such-scenario':" in output and "known: ['camera-skew'," in output
    assert "Traceback" not in output, output[-3000:]
    assert not any(tmp_path.iterdir())  # refused before writing anything


# -------------------------------------------------------------------------------------------- faulty sites
def test_a_short_round_under_wait_is_tried_again_then_fails_the_run_in_one_line(
    tiny_sites: dict[str, Path], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    runs = tmp_path / "runs"
    result = faulty_run(
        tmp_path,
        tmp_path_factory,
        iid_scenario(tmp_path, tiny_sites["aptos"], 4),
        "short",
        federation__min_sites=2,  # only one of the four faulty-app sites sends a usable update
        federation__short_round="wait",
        federation__round_attempts=2,
        federation__connect_deadline_s=60,
    )
    output = result.stdout + result.stderr  # (`flwr run` exits 0 whatever the run's fate)
    assert "fedretina: error: pretrain round 1: fewer than 2 accepted update(s) in 2 attempts" in output, (
        output[-3000:]
    )
    assert "Traceback" not in output
    run = runs / "short"
    kinds = [k for (k,) in store_rows(run, "SELECT kind FROM events ORDER BY time") if k.startswith("round")]
    assert kinds == ["round-short", "round-retry", "round-short"]
    attempts = store_rows(run, "SELECT DISTINCT attempt FROM replies WHERE kind = 'train' ORDER BY attempt")
    assert attempts == [(1,), (2,)]
    assert store_rows(run, "SELECT count(*) FROM replies WHERE aggregated = 1") == [(0,)]
    assert store_rows(run, "SELECT status FROM runs") == [("failed",)]
