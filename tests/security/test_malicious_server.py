"""A hostile server against a real site: crafted round specs and weights sent to the site's own ClientApp
(the `client.app:app` a SuperNode runs, called with Flower Messages as the SuperNode hands them over).

Each case must be refused in one line the site's log names (the server learns the error's class only),
before any work: nothing is written outside the site's state folder, and nothing inside it either, and
the dataset's bytes are unchanged. A well-formed round runs first through the same harness, so the harness
itself can fail."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from client.app import SiteFailure, app, train_secure
from shared.config import ExperimentConfig, load_config
from shared.data.checks import check_site
from shared.data.site import load_site
from shared.data.site_config import load_site_config
from shared.federation.wire import (
    ARRAYS,
    LAYOUT,
    MOMENTS,
    PACKED,
    PRETRAIN,
    SECAGG_SCALE,
    SPEC,
    RoundSpec,
    RunSpec,
    pack,
    pack_records,
    to_wire,
)
from shared.training.pretrain import build_spark
from tests.conftest import UID, write_site

pytestmark = pytest.mark.security
Content = dict[str, object]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checked EyePACS-like site whose state folder lives beside its dataset, in a folder of its own."""
    root = tmp_path_factory.mktemp("hostile-server")
    path = write_site(root, "eyepacs", 8)
    check_site(load_site_config(path), workers=1)
    return path


@pytest.fixture(scope="module")
def cfg() -> ExperimentConfig:
    return load_config(profile="tiny", overrides={"federation.rounds_pretrain": 1, "threads": 1})


def content(cfg: ExperimentConfig, **changes: object) -> Content:
    """A well-formed pretraining round's content as the server packs it: the spec's wire entries, then the
    packed weights and their layout (`changes` replace wire entries by their kebab-case key)."""
    spec = to_wire(RoundSpec(RunSpec(cfg, UID, ""), PRETRAIN, 1, {}))
    weights = {k: v.numpy() for k, v in build_spark(cfg).state_dict().items()}
    buffers, layouts = pack_records(weights)
    return {"spec": spec | changes, "buffers": buffers, "layouts": layouts}


def message(parts: Content, kind: str = "train.pretrain") -> Message:
    records = {name: ArrayRecord({PACKED: Array(b)}) for name, b in parts["buffers"].items()}  # type: ignore[union-attr]
    body = RecordDict({**records, LAYOUT: ConfigRecord(parts["layouts"]), SPEC: ConfigRecord(parts["spec"])})
    return Message(body, metadata=Metadata(1, "m1", 0, 7, "", "", 0.0, 600.0, kind))


def files(folder: Path) -> dict[str, str]:
    """Every file below `folder` with the sha256 of its bytes."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = Path(dirpath) / name
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def attack(
    site: Path, msg: Message, caplog: pytest.LogCaptureFixture, handler: Callable = app
) -> tuple[str, str]:
    """Send `msg` to the site's ClientApp; (what the server got back, the site log's last error line). The
    whole folder around the site (dataset, state, everything beside them) must be unchanged after it."""
    around = site.parent
    before = files(around)
    context = Context(
        run_id=1, node_id=7, node_config={"site-config": str(site)}, state=RecordDict(), run_config={}
    )
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="client.app"), pytest.raises(SiteFailure) as refused:
        handler(msg, context)
    assert files(around) == before, "the refused message changed files"
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1
    exc = logged[0].exc_info[1]  # type: ignore[index]
    return str(refused.value), f"{type(exc).__name__}: {exc}"


def test_a_well_formed_round_trains_and_writes_only_in_the_sites_state(
    site: Path, cfg: ExperimentConfig
) -> None:
    """The control: the harness's own round is accepted, writes below the state folder, leaves the data."""
    state, dataset = load_site_config(site).state_root, load_site_config(site).root
    data, outside = files(dataset), files(site.parent)
    context = Context(
        run_id=1, node_id=7, node_config={"site-config": str(site)}, state=RecordDict(), run_config={}
    )
    reply = app(message(content(cfg)), context)
    assert ARRAYS in reply.content and files(dataset) == data
    changed = {k for k, v in files(site.parent).items() if outside.get(k) != v}
    assert changed and all((site.parent / k).resolve().is_relative_to(state) for k in changed), changed
    assert any(f"federation/{UID}/pretrain-progress.json" in k for k in changed)


def escape(site: Path, to: str) -> str:
    """A relative path that, joined below the site's federation folder, lands at `site.parent / to`."""
    federation = load_site_config(site).state_root / "federation"
    return os.path.relpath(site.parent / to, federation)


def _config_with(cfg: ExperimentConfig, **changes: object) -> str:
    return json.dumps(json.loads(cfg.model_dump_json()) | changes)


def _federation(cfg: ExperimentConfig, **changes: object) -> dict:
    return json.loads(cfg.federation.model_dump_json()) | changes


def _layout(cfg: ExperimentConfig, rewrite: Callable[[list], list]) -> Content:
    parts = content(cfg)
    parts["layouts"] = {ARRAYS: json.dumps(rewrite(json.loads(parts["layouts"][ARRAYS])))}  # type: ignore[index]
    return parts


CASES: dict[str, tuple[Callable[[Path, ExperimentConfig], Message], str]] = {
    "run name that leaves the state folder": (
        lambda s, c: message(content(c, config=_config_with(c, name=escape(s, "escaped")))),
        "ConfigError: run spec: config: name: run name",
    ),
    "run name that is the dataset folder": (
        lambda s, c: message(content(c, config=_config_with(c, name=str(load_site_config(s).root)))),
        "ConfigError: run spec: config: name: run name",
    ),
    "run uid that leaves the state folder": (
        lambda s, c: message(content(c, **{"run-uid": escape(s, "escaped")})),
        "ConfigError: run spec: run-uid: run uid",
    ),
    "phase that is a path": (
        lambda s, c: message(content(c, phase="../../" + PRETRAIN)),
        "ConfigError: round spec: phase '../../pretrain' is not one of",
    ),
    "phase that is a glob": (
        lambda s, c: message(content(c, phase="**/pretrain")),
        "ConfigError: round spec: phase '**/pretrain' is not one of",
    ),
    "round far past the phase": (
        lambda s, c: message(content(c, round=10**6)),
        "ConfigError: round spec: round 1000000 outside",
    ),
    "task with a path for a name": (
        lambda s, c: message(content(c, tasks=json.dumps({"../dr": 5}))),
        "ConfigError: round spec: task: task '../dr'",
    ),
    "task with a million classes": (
        lambda s, c: message(content(c, tasks=json.dumps({"dr": 10**6}))),
        "ConfigError: round spec: task dr has 1000000 classes",
    ),
    "scenario named to a served site": (
        lambda s, c: message(content(c, scenario="natural")),
        "ConfigError: the server asks this node to play scenario 'natural'",
    ),
    "scenario given as a path": (
        lambda s, c: message(content(c, scenario=str(s))),
        "ConfigError: the server asks this node to play scenario",
    ),
    "a config the size of a disk": (
        lambda s, c: message(content(c, config=" " * 10**6)),
        "ConfigError: run spec: config: 1000000 characters",
    ),
    "an image size beyond the site's limit": (
        lambda s, c: message(content(c, config=_config_with(c, data={"image_size": 4096, "cache": False}))),
        "ConfigError: site eyepacs: the server asks image_size 4096, above this site's limit 1024",
    ),
    "fine-tuning local steps beyond the site's limit": (
        lambda s, c: message(
            content(c, config=_config_with(c, federation=_federation(c, local_steps_finetune=10**9)))
        ),
        "the server asks local_steps 1000000000, above this site's limit 100000",
    ),
    "more threads than the site allows": (
        lambda s, c: message(content(c, config=_config_with(c, threads=100_000))),
        "the server asks threads 100000",
    ),
    "an array of a terabyte in a few bytes": (
        lambda s, c: message(_layout(c, lambda e: [[e[0][0], "<f4", [2**38], 0, 2**40], *e[1:]])),
        "ValueError: ",
    ),
    "every entry reading the whole buffer": (
        lambda s, c: message(_layout(c, lambda e: [[k, d, sh, 0, n] for k, d, sh, _, n in e])),
        "do not follow the previous entry",
    ),
    "an object dtype": (
        lambda s, c: message(_layout(c, lambda e: [[e[0][0], "|O", *e[0][2:]], *e[1:]])),
        "dtype '|O' is not one of",
    ),
    "a layout that is not JSON": (
        lambda s, c: message({**content(c), "layouts": {ARRAYS: "{"}}),
        "ValueError: malformed weights layout",
    ),
    "weights of another shape": (
        lambda s, c: message(_layout(c, lambda e: [[e[0][0], e[0][1], [e[0][4] // 4], *e[0][3:]], *e[1:]])),
        "CheckpointError: global model: 1 tensors have other shapes",
    ),
    "weights missing a tensor": (
        lambda s, c: message(_layout(c, lambda e: e[:-1])),
        "ValueError: the weights layout covers",
    ),
    "moments nobody asked for": (
        lambda s, c: message(
            {**content(c), "buffers": {**content(c)["buffers"], MOMENTS: pack({"w": np.zeros(1, "<f4")})[0]}}  # type: ignore[dict-item]
        ),
        "per-parameter state travels with the model only under strategy mime or scaffold",
    ),
    "weights record that is text": (
        lambda s, c: Message(
            RecordDict({ARRAYS: ConfigRecord({PACKED: "text"}), SPEC: ConfigRecord(content(c)["spec"])}),  # type: ignore[arg-type]
            metadata=Metadata(1, "m1", 0, 7, "", "", 0.0, 600.0, "train.pretrain"),
        ),
        "holds no packed buffer",
    ),
    "a spec record that is missing": (
        lambda s, c: Message(
            RecordDict({}), metadata=Metadata(1, "m1", 0, 7, "", "", 0.0, 600.0, "train.pretrain")
        ),
        "KeyError",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_servers_message_is_refused_before_any_work(
    case: str, site: Path, cfg: ExperimentConfig, caplog: pytest.LogCaptureFixture
) -> None:
    build, expected = CASES[case]
    sent, logged = attack(site, build(site, cfg), caplog)
    assert sent.endswith(" at this site (details in the site's log)") and "\n" not in sent
    assert expected in logged, logged
    assert "\n" not in logged[:300]


def test_an_unknown_message_type_is_refused(site: Path, cfg: ExperimentConfig) -> None:
    context = Context(
        run_id=1, node_id=7, node_config={"site-config": str(site)}, state=RecordDict(), run_config={}
    )
    before = files(site.parent)
    for kind in ("train.exfiltrate", "query.images", "evaluate.pretrain"):
        with pytest.raises(ValueError, match=r"No (train|query|evaluate) function registered"):
            app(message(content(cfg), kind), context)
    assert files(site.parent) == before


def test_a_secure_rounds_scale_must_be_a_finite_positive_number(
    site: Path, cfg: ExperimentConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """SecAgg+'s scale comes from the server; NaN would slip a NaN vector past the range check. The
    handler is called as SecAgg+'s mod calls it at the protocol's training stage."""
    parts = content(cfg)
    for scale in (math.nan, 0.0, -1.0, math.inf):
        spec = parts["spec"] | {LAYOUT: parts["layouts"][ARRAYS], SECAGG_SCALE: scale}  # type: ignore[index, operator]
        fitins = FitIns(ndarrays_to_parameters([parts["buffers"][ARRAYS]]), spec)  # type: ignore[index]
        meta = Metadata(1, "m", 0, 7, "", "", 0.0, 600.0, "train")
        msg = Message(compat.fitins_to_recorddict(fitins, keep_input=True), metadata=meta)
        _, logged = attack(site, msg, caplog, handler=train_secure)
        assert f"{SECAGG_SCALE} {scale}: expected a finite number > 0" in logged


def test_the_dataset_and_the_sites_files_are_unchanged_after_every_case(site: Path) -> None:
    """Summed up: the dataset's bytes are as rendered (its own files hashed against the check's report)."""
    config = load_site_config(site)
    assert len(load_site(site).rows) == 16  # 8 patients, both eyes
    assert not any(p.name == "escaped" for p in site.parent.rglob("*"))
    assert not any(p.suffix == ".safetensors" for p in config.root.rglob("*"))
