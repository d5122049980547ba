"""A failing site tells the server what kind of error it hit, never the message (which may name a patient's
file); the whole story stays in the site's own log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from client.app import SiteFailure, describe
from shared.config import load_config
from shared.federation.wire import SPEC, RunSpec, to_wire
from tests.conftest import UID


def test_a_failure_leaves_the_site_as_its_class_name_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = tmp_path / "Jane-Doe-1961-04-02" / "site.yaml"
    context = Context(
        run_id=1, node_id=7, node_config={"site-config": str(secret)}, state=RecordDict(), run_config={}
    )
    meta = Metadata(1, "m1", 0, 7, "", "", 0.0, 60.0, "query")  # as a SuperNode receives it
    spec = RunSpec(load_config(profile="tiny"), UID, "")
    msg = Message(RecordDict({SPEC: ConfigRecord(to_wire(spec))}), metadata=meta)
    with caplog.at_level(logging.ERROR, logger="client.app"), pytest.raises(SiteFailure) as raised:
        describe(msg, context)
    assert str(raised.value) == "ConfigError at this site (details in the site's log)"
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert "Jane-Doe" in caplog.text  # the site's operator still sees which file
