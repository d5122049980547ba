"""`fedretina site evaluate`: a site scores a run's model on its own test patients, reading the model's
settings from the file, writing nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from client.evaluate import evaluate_model
from shared.config import OPERATIONAL, load_config, shaping_settings, without
from shared.data.checks import check_site
from shared.data.site import load_site
from shared.data.site_config import load_site_config
from shared.metrics import evaluate_predictions
from shared.training.finetune import build_task_model, predict_rows, site_test_rows
from shared.weights import config_of, load_weights, save_weights, weights_meta
from tests.conftest import write_site
from tests.security.cli import fedretina, one_error

TASKS = {"dr": 5}
MADE = {"model.width_mult": 0.35, "finetune.referable_threshold": 3}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_site(tmp_path_factory.mktemp("evaluate"), "eyepacs", 24)
    check_site(load_site_config(path))
    return path


def _model(tmp_path: Path, kind: str = "task-model", tasks: object = TASKS) -> tuple[Path, torch.nn.Module]:
    cfg = load_config(profile="tiny", overrides=MADE)
    torch.manual_seed(1)
    model = build_task_model(cfg, TASKS)
    path = tmp_path / "model.safetensors"
    save_weights(path, model.state_dict(), weights_meta(cfg, kind, tasks=tasks))
    return path, model


def test_a_model_file_rebuilds_the_settings_it_was_made_with(tmp_path: Path) -> None:
    path, _ = _model(tmp_path)
    _, meta = load_weights(path)
    cfg = config_of(path, meta)
    made = load_config(profile="tiny", overrides=MADE)
    assert shaping_settings(cfg) == without(shaping_settings(made), OPERATIONAL)
    assert cfg.model.width_mult == 0.35 and cfg.finetune.referable_threshold == 3


def test_the_scores_are_the_models_own_on_the_test_split_only(site: Path, tmp_path: Path, capsys) -> None:
    """The command's numbers equal the metrics of the model's own predictions on the test split (and the
    test split alone), its interval holds the point, and nothing changed but the site's image cache."""
    path, model = _model(tmp_path)
    found = load_site(site)
    before = _hashes(site.parent)
    [score] = evaluate_model(found, path, resamples=200)
    rows = site_test_rows(found, "dr")
    assert set(rows["split"]) == {"test"} and score.images == len(rows) > 0
    cfg = config_of(path, load_weights(path)[1])
    y, p = predict_rows(model.eval(), found, cfg, "dr", rows, torch.device("cpu"))
    expected = evaluate_predictions(y, p, "dr", referable_threshold=3)
    assert score.metrics == pytest.approx(expected, nan_ok=True)
    low, high = score.interval
    assert score.headline == "referable_auc" and low <= expected["referable_auc"] <= high
    code, _ = fedretina(["site", "evaluate", str(site), "-m", str(path)], capsys)
    assert code == 0 and _hashes(site.parent) == before


@pytest.mark.parametrize(
    ("kind", "tasks", "message"),
    [
        ("spark-encoder", TASKS, "not a fine-tuned model"),
        ("task-model", {"dr": 10**6}, "its record's task 'dr' with 1000000 classes is not one we write"),
        ("task-model", {"../x": 5}, "its record's task '../x'"),
        ("task-model", {"dr": "5"}, "its record's task 'dr' with '5' classes"),
    ],
)
def test_a_file_that_is_not_a_fine_tuned_model_is_one_line(
    site: Path, tmp_path: Path, capsys, kind: str, tasks: object, message: str
) -> None:
    path, _ = _model(tmp_path, kind=kind, tasks=tasks)
    code, err = fedretina(["site", "evaluate", str(site), "-m", str(path)], capsys)
    assert code == 4 and message in one_error(err)


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "cache" not in p.relative_to(folder).parts
    }
