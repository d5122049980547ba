"""The ClientApp: Flower glue around `client/local.py`. Each handler turns the message into (site, config,
round spec, weights), calls one local function, and replies with one ArrayRecord and one MetricRecord.

Message types: `query` (who is this site), `train.pretrain` (phase 1), `train.finetune` and
`evaluate.finetune` (phase 2). Images never leave: replies hold weights, counts and metrics only, and a
failure tells the server only the kind of error (the message may name a patient's file); the site's own log
keeps the whole traceback.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.local import RoundSpec, evaluate_round, finetune_round, pretrain_round
from client.site import resolve_site
from shared.config import ExperimentConfig, from_run_config
from shared.data.manifest import held_tasks, task_classes
from shared.data.site import Site

app = ClientApp()
log = logging.getLogger(__name__)
Handler = Callable[[Message, Context], Message]


class SiteFailure(Exception):
    """What leaves the site when a handler fails: the error's class, never its message or traceback."""


def _private(handler: Handler) -> Handler:
    """Log a failure in full here, and raise only its class name to Flower (which sends it to the server)."""

    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            log.exception("%s failed at this site", msg.metadata.message_type)
            raise SiteFailure(f"{type(exc).__name__} at this site (details in the site's log)") from None

    return guarded


def _inputs(msg: Message, context: Context) -> tuple[Site, ExperimentConfig, RoundSpec]:
    cfg, options = from_run_config(context.run_config)
    site = resolve_site(context.node_config, options, cfg.seed)
    c = msg.content["config"]
    spec = RoundSpec(
        phase=str(c["phase"]),
        round=int(c["round"]),
        total_rounds=int(c["total-rounds"]),
        local_epochs=int(c["local-epochs"]),
        local_steps=int(c.get("local-steps", 0)),
        proximal_mu=float(c.get("proximal-mu", 0.0)),
        strategy=str(c["strategy"]),
        run_name=options.run_name,
        tasks=tuple(c.get("tasks", [])),
        classes=tuple(int(k) for k in c.get("classes", [])),
        run_uid=str(c["run-uid"]),
    )
    return site, cfg, spec


def _reply(msg: Message, metrics: dict, arrays: dict | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content=content, reply_to=msg)


@app.query()
@_private
def describe(msg: Message, context: Context) -> Message:
    """Name, partition, image count and labelled images per task, for the server's site directory."""
    cfg, options = from_run_config(context.run_config)
    site = resolve_site(context.node_config, options, cfg.seed)
    held, classes = held_tasks(site.rows), task_classes(site.rows)
    info = ConfigRecord(
        {
            "site": site.name,
            "partition": int(context.node_config.get("partition-id", -1)),
            "images": len(site.rows),
            "tasks": list(held),
            "labelled": list(held.values()),
            "classes": [classes[t] for t in held],
        }
    )
    return Message(content=RecordDict({"site": info}), reply_to=msg)


@app.train("pretrain")
@_private
def train_pretrain(msg: Message, context: Context) -> Message:
    site, cfg, spec = _inputs(msg, context)
    arrays, metrics = pretrain_round(site, cfg, spec, msg.content["arrays"].to_torch_state_dict())
    return _reply(msg, metrics, arrays)


@app.train("finetune")
@_private
def train_finetune(msg: Message, context: Context) -> Message:
    site, cfg, spec = _inputs(msg, context)
    arrays, metrics = finetune_round(site, cfg, spec, msg.content["arrays"].to_torch_state_dict())
    return _reply(msg, metrics, arrays)


@app.evaluate("finetune")
@_private
def evaluate_finetune(msg: Message, context: Context) -> Message:
    site, cfg, spec = _inputs(msg, context)
    return _reply(msg, evaluate_round(site, cfg, spec, msg.content["arrays"].to_torch_state_dict()))
