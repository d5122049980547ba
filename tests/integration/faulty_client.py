"""A ClientApp with deliberately faulty sites, for the server's update validation.

It runs the real handlers of `client/app.py` and corrupts the train reply of some partitions: 1 sends a
NaN, 2 a tensor of the wrong shape, 3 an update of enormous norm; partition 0 is honest. Only the test
that needs faulty participants installs it (as its app's clientapp); nothing in the product uses it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client.app import describe, evaluate_finetune, train_finetune, train_pretrain


def _corrupt(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    partition = int(context.node_config.get("partition-id", 0))
    if not msg.metadata.message_type.startswith("train") or partition == 0 or reply.has_error():
        return reply
    arrays = {k: v.numpy().copy() for k, v in reply.content["arrays"].items()}
    key = next(k for k, v in arrays.items() if v.dtype == np.float32 and v.ndim == 4)
    if partition == 1:
        arrays[key].flat[0] = np.nan
    elif partition == 2:
        arrays[key] = arrays[key][:1]
    else:
        arrays[key] = arrays[key] * 1e7
    reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return reply


app = ClientApp(mods=[_corrupt])
app.query()(describe)
app.train("pretrain")(train_pretrain)
app.train("finetune")(train_finetune)
app.evaluate("finetune")(evaluate_finetune)
