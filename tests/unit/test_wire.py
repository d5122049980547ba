"""The wire schema: specs survive the trip through a Flower ConfigRecord unchanged, keys are kebab-case
field names (written by no one by hand), and a spec from another version fails in one line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from client.rounds import round_span
from shared.config import load_config
from shared.errors import ConfigError
from shared.federation.wire import (
    FINETUNE,
    LAYOUT,
    MOMENTS,
    PACKED,
    RoundSpec,
    RunSpec,
    SiteReport,
    from_wire,
    pack,
    pack_records,
    to_wire,
    unpack,
    unpacked,
)
from shared.models import nnmobilenet
from shared.training.phase import Span
from tests.conftest import UID


def round_spec() -> RoundSpec:
    cfg = load_config(
        profile="tiny",
        overrides={
            "federation.local_steps": 3,
            "federation.strategy": "fedprox",
            "federation.rounds_finetune": 4,
        },
    )
    return RoundSpec(RunSpec(cfg, UID, "natural"), FINETUNE, 2, {"dr": 5, "mmac": 5})


def test_a_round_spec_survives_a_config_record_unchanged() -> None:
    spec = round_spec()
    record = ConfigRecord(to_wire(spec))  # Flower accepts every value as it is
    back = from_wire(RoundSpec, dict(record))
    assert back == spec and back.config == spec.config
    assert set(record) == {"config", "run-uid", "scenario", "phase", "round", "tasks"}
    assert round_span(back) == Span(3, 6, 3 * back.config.federation.rounds_finetune, steps=True)


def test_the_site_report_and_the_run_spec_round_trip() -> None:
    report = SiteReport("eyepacs", 0, 480, {"dr": 480}, {"dr": 5})
    assert from_wire(SiteReport, dict(ConfigRecord(to_wire(report)))) == report
    run = round_spec().run
    assert from_wire(RunSpec, to_wire(run)) == run


def test_a_spec_missing_a_key_or_with_a_bad_value_is_one_line() -> None:
    wire = to_wire(round_spec())
    with pytest.raises(ConfigError, match="run spec: no 'run-uid'; the server and the site run different"):
        from_wire(RoundSpec, {k: v for k, v in wire.items() if k != "run-uid"})
    with pytest.raises(ConfigError, match="round spec: round: cannot read 'two'"):
        from_wire(RoundSpec, wire | {"round": "two"})
    with pytest.raises(ConfigError, match=r"round spec: round: cannot read 2.5 \(not a whole number\)"):
        from_wire(RoundSpec, wire | {"round": 2.5})
    report = to_wire(SiteReport("eyepacs", 0, 480, {"dr": 480}, {"dr": 5}))
    with pytest.raises(ConfigError, match="site report: labelled: cannot read"):
        from_wire(SiteReport, report | {"labelled": "[480]"})  # a list where a mapping belongs
    # the server files a site's local model under its reported name (the cross-site table)
    with pytest.raises(ConfigError, match=r"site report: site: site '\.\./\.\./etc/x': expected lower-case"):
        from_wire(SiteReport, report | {"site": "../../etc/x"})
    with pytest.raises(ConfigError, match=r"site report: task: task 'DR/..': expected"):
        from_wire(SiteReport, report | {"classes": '{"DR/..": 5}'})


def test_weights_pack_into_one_buffer_and_back_bitwise() -> None:
    model = nnmobilenet(width_mult=0.25)
    state = {k: v.numpy() for k, v in model.state_dict().items()}  # float32 weights, int64 counters
    buffer, layout = pack(state)
    assert buffer.dtype == np.uint8 and buffer.size == sum(v.nbytes for v in state.values())
    back = unpack(buffer, layout)
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        assert np.array_equal(back[key], value), key


def test_a_layout_that_does_not_describe_the_buffer_is_a_value_error_naming_the_tensor() -> None:
    buffer, layout = pack({"encoder.w": np.ones((2, 3), np.float32)})
    with pytest.raises(ValueError, match=r"encoder.w: bytes 0..4000 do not follow the previous entry"):
        unpack(buffer, layout.replace("24]", "4000]"))
    with pytest.raises(ValueError, match=r"encoder.w: shape \(5,\) of <f4 is not 24 bytes"):
        unpack(buffer, layout.replace("[2, 3]", "[5]"))
    with pytest.raises(ValueError, match="malformed weights layout"):
        unpack(buffer, "not json")


def test_a_peers_layout_cannot_make_the_arrays_outgrow_the_bytes_that_came() -> None:
    """The layout is the sender's: entries must tile the buffer once, in order, with known dtypes."""
    one = np.ones(4, np.float32)
    buffer, _ = pack({"a": one})
    entry = ["a", "<f4", [4], 0, 16]
    overlapping = json.dumps([entry, ["b", "<f4", [4], 0, 16]])  # 2 arrays from 16 bytes, or 1,000
    cases = {
        overlapping: "b: bytes 0..16 do not follow",
        json.dumps([["a", "<f4", [2], 0, 8]]): "covers 8 of the buffer's 16 bytes",
        json.dumps([["a", "|O", [2], 0, 16]]): "dtype '|O' is not one of",
        json.dumps([["a", "<f4", [2], 0, 8], ["a", "<f4", [2], 8, 8]]): "a: twice",
        json.dumps([["a", "<f4", [-4], 0, 16]]): "whole numbers >= 0",
        json.dumps([["a", "<f4", [4], 0, 16.0]]): "whole numbers >= 0",
        json.dumps([entry] * 5000): "at most 4096 entries",
        json.dumps({"a": entry}): "a list of at most",
        json.dumps([["a", "<f4"]]): "not [key, dtype, shape, offset, size]",
    }
    for layout, message in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            unpack(buffer, layout)
    assert np.array_equal(unpack(buffer, json.dumps([entry]))["a"], one)


def test_a_reply_record_of_the_wrong_kind_is_a_value_error_and_a_missing_one_a_key_error() -> None:
    weights = {"encoder.w": np.ones((2, 3), np.float32)}
    buffers, layouts = pack_records(weights, {"encoder.w/step": np.array(3.0)})
    records = {name: ArrayRecord({PACKED: Array(buffer)}) for name, buffer in buffers.items()}
    content = RecordDict({**records, LAYOUT: ConfigRecord(layouts)})
    assert np.array_equal(unpacked(content)["encoder.w"], weights["encoder.w"])
    assert float(unpacked(content, MOMENTS)["encoder.w/step"]) == 3.0
    # a site's reply is input: any record may hold anything
    wrong = RecordDict({**records, MOMENTS: ConfigRecord({PACKED: "text"}), LAYOUT: ConfigRecord(layouts)})
    with pytest.raises(ValueError, match="record 'moments' holds no packed buffer"):
        unpacked(wrong, MOMENTS)
    with pytest.raises(KeyError):
        unpacked(RecordDict({LAYOUT: ConfigRecord(layouts)}), MOMENTS)


def test_a_servers_round_spec_is_checked_where_it_is_parsed() -> None:
    """Everything a site builds paths, heads or plans from is refused in one line unless it has its form."""
    wire = to_wire(round_spec())
    config = json.loads(str(wire["config"]))
    cases = {
        "run-uid": ("../../escaped", "run spec: run-uid: run uid '../../escaped': expected 12"),
        "phase": ("../pretrain", "round spec: phase '../pretrain' is not one of"),
        "round": (0, "round spec: round 0 outside the phase's 1..4"),
        "tasks": (json.dumps({"../x": 5}), "round spec: task: task '../x'"),
        "config": (json.dumps(config | {"name": "../../escaped"}), "run name '../../escaped'"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            from_wire(RoundSpec, wire | {key: value})
    with pytest.raises(ConfigError, match=r"task dr has 1000000 classes; expected 2\.\.100"):
        from_wire(RoundSpec, wire | {"tasks": json.dumps({"dr": 10**6})})
    many = json.dumps({f"t{i}": 2 for i in range(17)})
    with pytest.raises(ConfigError, match="17 tasks; at most 16"):
        from_wire(RoundSpec, wire | {"tasks": many})
    with pytest.raises(ConfigError, match="characters; at most 256000"):
        from_wire(RoundSpec, wire | {"config": " " * 300_000})
