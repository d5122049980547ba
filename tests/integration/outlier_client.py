"""A ClientApp whose last partition sends a bad-but-valid update: its real training's change to every
parameter, flipped and fifty times as large. Finite, of the right shapes, within the norm bound: the
server's validation accepts it, and only a robust aggregator keeps it out of the model. The others are
honest (the real handlers of `client/app.py`). Only the robust-aggregator test installs it (as its app's
clientapp)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client.app import describe, evaluate, final_test, train
from shared.federation.wire import LAYOUT, PACKED, pack_records, unpacked

ATTACKER = 2  # the partition that lies
AMPLIFY = -50.0


def _outlier(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    partition = int(context.node_config.get("partition-id", 0))
    if partition != ATTACKER or not msg.metadata.message_type.startswith("train") or reply.has_error():
        return reply
    start, trained = unpacked(msg.content), unpacked(reply.content)
    lied = {
        k: (start[k] + AMPLIFY * (v - start[k])).astype(v.dtype) if _learnt(k, v) else v
        for k, v in trained.items()
    }
    buffers, layouts = pack_records(lied)
    reply.content["arrays"] = ArrayRecord({PACKED: Array(buffers["arrays"])})
    reply.content[LAYOUT] = ConfigRecord(layouts)
    return reply


def _learnt(key: str, value: np.ndarray) -> bool:
    """A parameter (BatchNorm's statistics stay honest: a negative variance would be refused outright)."""
    return np.issubdtype(value.dtype, np.floating) and not key.endswith(("running_mean", "running_var"))


app = ClientApp(mods=[_outlier])
app.query()(describe)
app.train("pretrain")(train)
app.train("finetune")(train)
app.evaluate("finetune")(evaluate)
app.evaluate("test")(final_test)
