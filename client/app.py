"""The ClientApp: Flower glue around `client/rounds.py`. Each handler reads the message's spec and weights,
resolves this node's site, calls one function, and replies with one ArrayRecord and one MetricRecord.

Message types: `query` (who is this site), `train.pretrain` (phase 1), `train.finetune` and
`evaluate.finetune` (phase 2), and `train` (either phase's training under secure aggregation). Images never
leave: replies hold weights, counts and metrics only, and a failure tells the server only the kind of error
(the message may name a patient's file); the site's own log keeps the whole traceback. The run config is
never read here: everything run-level comes in the spec."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from client.limits import check_round
from client.node import node_site, partition_of
from client.rounds import evaluate_round, train_round
from shared.data.manifest import labelled_counts, task_classes
from shared.data.site import Site
from shared.errors import ConfigError
from shared.federation.aggregation import site_update
from shared.federation.securesum import REFUSED_BUDGET, REFUSED_RANGE, OutOfRange, secure_layout
from shared.federation.strategies import strategy_of
from shared.federation.wire import (
    ARRAYS,
    LAYOUT,
    METRICS,
    MOMENTS,
    PACKED,
    REASON,
    REFUSAL,
    REPORT,
    SECAGG_REFUSAL,
    SECAGG_SCALE,
    SPEC,
    RoundSpec,
    RunSpec,
    SiteReport,
    from_wire,
    pack_records,
    to_wire,
    unpack,
    unpacked,
)
from shared.rundir import private_files
from shared.seeding import derive_seed

app = ClientApp()
log = logging.getLogger(__name__)
Handler = Callable[[Message, Context], Message]


class SiteFailure(Exception):
    """What leaves the site when a handler fails: the error's class, never its message or traceback."""


def _private(handler: Handler) -> Handler:
    """Log a failure in full here, and raise only its class name to Flower (which sends it to the server)."""

    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        private_files()
        try:
            return handler(msg, context)
        except Exception as exc:
            log.exception("%s failed at this site", msg.metadata.message_type)
            raise SiteFailure(f"{type(exc).__name__} at this site (details in the site's log)") from None

    return guarded


def _round(msg: Message, context: Context, record: Any = None) -> tuple[Site, RoundSpec]:
    """This node's site and the round's spec, checked (form on parsing, then against the site's limits)."""
    spec = from_wire(RoundSpec, msg.content[SPEC] if record is None else record)
    site = node_site(context.node_config, spec.run)
    check_round(site, spec)
    return site, spec


def _reply(
    msg: Message,
    metrics: dict,
    arrays: dict[str, torch.Tensor] | None = None,
    moments: dict[str, torch.Tensor] | None = None,
) -> Message:
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if arrays is not None:  # packed, as the server sends them (`shared/federation/wire.py:pack_records`)
        plain = {k: v.numpy() for k, v in moments.items()} if moments is not None else None
        buffers, layouts = pack_records({k: v.numpy() for k, v in arrays.items()}, plain)
        for name, buffer in buffers.items():
            content[name] = ArrayRecord({PACKED: Array(buffer)})
        content[LAYOUT] = ConfigRecord(layouts)
    return Message(content=content, reply_to=msg)


def _weights(msg: Message, name: str = ARRAYS) -> dict[str, torch.Tensor]:
    return _tensors(unpacked(msg.content, name))


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Writable tensors of the unpacked weights (which are views of the message's read-only buffer)."""
    return {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}


@app.query()
@_private
def describe(msg: Message, context: Context) -> Message:
    """Name, partition, image count and labelled images per task, for the server's site directory."""
    site = node_site(context.node_config, from_wire(RunSpec, msg.content[SPEC]))
    held, classes = labelled_counts(site.rows), task_classes(site.rows)
    report = SiteReport(
        site.name, partition_of(context.node_config), len(site.rows), held, {t: classes[t] for t in held}
    )
    return Message(content=RecordDict({REPORT: ConfigRecord(to_wire(report))}), reply_to=msg)


@app.train("pretrain")
@app.train("finetune")
@_private
def train(msg: Message, context: Context) -> Message:
    site, spec = _round(msg, context)
    f = spec.config.federation
    if (MOMENTS in msg.content) != strategy_of(f.strategy).moments_travel(f):
        raise ConfigError(
            "per-parameter state travels with the model only under strategy mime or scaffold, or "
            "federation.carry_optimizer"
        )
    carried = _weights(msg, MOMENTS) if MOMENTS in msg.content else None  # the chain's, or the server's
    trained = train_round(site, spec, _weights(msg), carried)
    reply = _reply(msg, trained.metrics, trained.weights, trained.moments)
    if trained.refused is not None:  # no weights: the server records why (e.g. the privacy budget)
        reply.content[REFUSAL] = ConfigRecord({REASON: trained.refused})
    return reply


@app.train(mods=[secaggplus_mod])
@_private
def train_secure(msg: Message, context: Context) -> Message:
    """A round under secure aggregation (SecAgg+, message type "train"): Flower's mod answers the
    protocol's other stages itself, calls this for the training stage and masks what it returns: the site's
    weighted change (`shared/federation/securesum.py`), in the legacy FitRes layout the mod reads. Only the
    metrics travel in clear. A site that cannot take part (its privacy budget, an update beyond the clipping
    range) sends zeros, which add nothing to the sum, and says why in a metric."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    site, spec = _round(msg, context, fitins.config)
    (buffer,) = parameters_to_ndarrays(fitins.parameters)
    reference = unpack(buffer, str(fitins.config[LAYOUT]))
    scale = float(fitins.config[SECAGG_SCALE])  # type: ignore[arg-type]
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"{SECAGG_SCALE} {scale}: expected a finite number > 0")
    layout = secure_layout(reference, spec, scale)
    trained = train_round(site, spec, _tensors(reference))
    vector, refusal = np.zeros(layout.size), REFUSED_BUDGET if trained.refused else 0
    if trained.weights is not None:
        arrays = {k: v.numpy() for k, v in trained.weights.items()}
        try:
            vector = layout.encode(site_update(site.name, arrays, trained.metrics, spec.tasks), reference)
        except OutOfRange as exc:
            log.warning("%s: refused %s round %d: %s", site.name, spec.phase, spec.round, exc)
            refusal = REFUSED_RANGE
    # the mod rounds stochastically with numpy's global generator: seeded, a run is reproducible
    np.random.seed(derive_seed(spec.config.seed, "secagg", spec.phase, spec.round, site.name) % 2**32)
    metrics = {**trained.metrics, SECAGG_REFUSAL: refusal}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vector]), 1, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


@app.evaluate("finetune")
@_private
def evaluate(msg: Message, context: Context) -> Message:
    site, spec = _round(msg, context)
    return _reply(msg, evaluate_round(site, spec, _weights(msg)))


@app.evaluate("test")
@_private
def final_test(msg: Message, context: Context) -> Message:
    """The run's final model on this site's held-out test patients: metrics only, as every reply."""
    site, spec = _round(msg, context)
    return _reply(msg, evaluate_round(site, spec, _weights(msg), test=True))
