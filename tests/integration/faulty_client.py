"""A ClientApp with deliberately faulty sites, for the server's update validation.

It runs the real handlers of `client/app.py` and corrupts the train reply of some partitions: 1 sends a
NaN (in the optimiser moments it hands on, when the run carries them), 2 a tensor of the wrong shape, 3 an
update of enormous norm in pretraining and, in fine-tuning, fails inside the handler on a site YAML whose
path names a patient (which must not reach the server); partition 0 and any from 4 on are honest. Only the
test that needs faulty participants installs it (as its app's clientapp); nothing in the product uses it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client.app import describe, evaluate, final_test, train
from shared.federation.wire import LAYOUT, MOMENTS, PACKED, pack_records, unpacked

PATIENT_PATH = "/hospital/Jane-Doe-1961-04-02/site.yaml"


def _corrupt(msg: Message, context: Context, call_next) -> Message:
    partition = int(context.node_config.get("partition-id", 0))
    if partition == 3 and msg.metadata.message_type == "train.finetune":
        lost = Context(
            context.run_id, context.node_id, {"site-config": PATIENT_PATH}, context.state, context.run_config
        )
        return call_next(msg, lost)
    reply = call_next(msg, context)
    if not msg.metadata.message_type.startswith("train") or partition not in (1, 2, 3) or reply.has_error():
        return reply
    arrays = {k: v.copy() for k, v in unpacked(reply.content).items()}
    carried = MOMENTS in reply.content
    moments = {k: v.copy() for k, v in unpacked(reply.content, MOMENTS).items()} if carried else None
    key = next(k for k, v in arrays.items() if v.dtype == np.float32 and v.ndim == 4)
    if partition == 1 and moments:  # the weights honest, the optimiser moments it hands on not
        moments[next(k for k in moments if k.endswith("/exp_avg"))].flat[0] = np.nan
    elif partition == 1:
        arrays[key].flat[0] = np.nan
    elif partition == 2:
        arrays[key] = arrays[key][:-1]  # one output channel short: does not broadcast against the reference
    else:  # partition 3
        arrays[key] = arrays[key] * 1e7
    buffers, layouts = pack_records(arrays, moments)
    for name, buffer in buffers.items():
        reply.content[name] = ArrayRecord({PACKED: Array(buffer)})
    reply.content[LAYOUT] = ConfigRecord(layouts)
    return reply


app = ClientApp(mods=[_corrupt])
app.query()(describe)
app.train("pretrain")(train)
app.train("finetune")(train)
app.evaluate("finetune")(evaluate)
app.evaluate("test")(final_test)
