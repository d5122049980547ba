"""The experiment configuration: profiles, layering, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from shared.config import PROFILES, ConfigError, load_config, parse_overrides
from tests.conftest import FEDRETINA, ROOT


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FEDRETINA, *args], capture_output=True, text=True, check=False)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_resolves_to_a_valid_config(profile: str) -> None:
    cfg = load_config(profile=profile)
    assert cfg.profile == profile
    assert cfg.data.image_size % 32 == 0
    assert cfg.pretrain.batch_size >= 2


@pytest.mark.parametrize("study", sorted(p.name for p in (ROOT / "simulation" / "studies").glob("*.yaml")))
def test_every_shipped_study_config_resolves(study: str) -> None:
    """The study and comparison configs the docs tell people to run are valid as shipped; compare's name
    only strategies they define."""
    cfg = load_config(ROOT / "simulation" / "studies" / study)
    for names in cfg.compare.scenarios.values():
        assert set(names) <= set(cfg.compare.strategies)


def test_profiles_differ_where_they_should() -> None:
    tiny, cpu, paper = (load_config(profile=p) for p in PROFILES)
    assert tiny.data.image_size < cpu.data.image_size < paper.data.image_size
    assert paper.model.width_mult == 3.0 and paper.pretrain.decoder_width == 768
    assert paper.finetune_image_size == 512
    assert tiny.model.width_mult < cpu.model.width_mult < paper.model.width_mult


def test_layers_profile_then_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"profile": "tiny", "pretrain": {"epochs": 5, "batch_size": 4}}))
    cfg = load_config(
        path, overrides=parse_overrides(["pretrain.epochs=7", "finetune.label-fractions=[1, 0.1]"])
    )
    assert cfg.profile == "tiny"
    assert cfg.data.image_size == 64  # from the profile
    assert cfg.pretrain.batch_size == 4  # from the YAML
    assert cfg.pretrain.epochs == 7  # from the override
    assert cfg.finetune.label_fractions == (1.0, 0.1)


def test_config_is_frozen() -> None:
    cfg = load_config(profile="tiny")
    with pytest.raises(Exception, match="frozen"):
        cfg.pretrain.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pretrain:\n  epoch: 3\n", "pretrain.epoch: unknown key; did you mean 'epochs'?"),
        ("pretrain:\n  epochs: ten\n", "pretrain.epochs: input should be a valid integer"),
        ("data:\n  image_size: 100\n", "data.image_size: must be a positive multiple of 32"),
        ("profile: huge\n", "profile: unknown profile 'huge'"),
        (
            "federation:\n  strategy: cyclic\n  secure_aggregation: true\n",
            "federation: secure_aggregation: cyclic weight transfer passes each site's own model on",
        ),
        (
            "federation:\n  carry_optimizer: true\n",
            "federation: carry_optimizer: the optimiser travels along the chain of strategy cyclic, not "
            "fedavg",
        ),
        ("pretrain: [\n", "not valid YAML (line 2)"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_bad_config_exits_2_with_one_line_naming_the_problem(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run_cli("config", "--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"fedretina: error: {path}: ")
    assert expected in lines[0]
    assert result.stdout == ""


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("config", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"fedretina: error: {tmp_path / 'nope.yaml'}: no such config file"


def test_bad_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["pretrain.epochs"])
    result = run_cli("config", "--profile", "tiny", "--set", "model.width_mult=wide")
    assert result.returncode == 2
    assert "config: model.width_mult: input should be a valid number" in result.stderr


def app_run_config() -> dict:
    """The run config Flower sends when nothing is overridden: pyproject.toml's table, the one default."""
    import tomllib

    from tests.conftest import ROOT

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_run_config_defaults_leave_the_experiment_yamls_own_values(tmp_path: Path) -> None:
    from shared.config import RUN_CONFIG_KEYS, from_run_config

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"profile": "tiny", "seed": 5}))
    defaults = app_run_config() | {"config": str(path), "run-name": "r"}
    assert set(defaults) == set(RUN_CONFIG_KEYS)
    cfg, options = from_run_config(defaults)
    assert (cfg.profile, cfg.seed, cfg.name, options.run_name) == ("tiny", 5, "r", "r")
    assert options.scenario == "natural" and not options.resume
    cfg, _ = from_run_config(defaults | {"seed": 7, "set": "seed=9 pretrain.epochs=3"})
    assert cfg.seed == 9 and cfg.pretrain.epochs == 3  # `set` applies last
    cfg, _ = from_run_config(defaults | {"profile": "cpu"})
    assert cfg.profile == "cpu"


def test_a_run_config_without_a_key_or_with_a_stray_one_is_refused() -> None:
    from shared.config import from_run_config

    run_config = app_run_config()
    with pytest.raises(
        ConfigError, match=r"run config: missing keys \['scenario'\]; the app's pyproject.toml"
    ):
        from_run_config({k: v for k, v in run_config.items() if k != "scenario"})
    with pytest.raises(ConfigError, match=r"unknown keys \['rounds'\]"):
        from_run_config(run_config | {"rounds": 3})


def test_an_mlflow_uri_with_credentials_is_refused_and_a_bare_name_lives_under_runs_dir(
    tmp_path: Path,
) -> None:
    """The URI is stored with the run (config.yaml, the run store): a password in it would be kept."""
    from server.tracking import tracking_uri

    with pytest.raises(
        ConfigError, match=r"tracking.mlflow_uri: the URI carries credentials; set MLFLOW_TRACKING"
    ):
        load_config(profile="tiny", overrides={"tracking.mlflow_uri": "https://me:secret@mlflow.lab:5000"})
    assert load_config(profile="tiny", overrides={"tracking.mlflow_uri": "https://mlflow.lab:5000"})
    assert tracking_uri("mlflow.db", tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"


def test_a_cross_site_table_is_refused_where_no_model_is_one_sites_own_or_it_would_expose_one() -> None:
    for overrides, why in (
        ({"federation.secure_aggregation": True}, "which secure aggregation hides"),
        ({"federation.strategy": "cyclic"}, "strategy cyclic chains the sites"),
    ):
        with pytest.raises(ConfigError, match=f"federation: cross_site: .*{why}"):
            load_config(profile="tiny", overrides={"federation.cross_site": True, **overrides})
    assert load_config(profile="tiny", overrides={"federation.cross_site": True}).federation.cross_site
