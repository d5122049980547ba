"""A ClientApp whose sites drop out of secure aggregation mid-round, after the key exchange: partition 2
fails its training stage in both phases (two of three sites are left, enough to unmask the sum), partition 1
in fine-tuning too (one site is left, fewer than the reconstruction threshold: the protocol halts).
Partition 0 is honest. Only the secure-aggregation test installs it; nothing in the product uses it.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from client.app import describe, evaluate, final_test, train, train_secure

DROPS = {"pretrain": {2}, "finetune": {1, 2}}


class DroppedOut(Exception):
    """This site's process died after sharing its keys (as a crash or a lost connection would)."""


def _drop(msg: Message, context: Context, call_next) -> Message:
    """Inside SecAgg+'s mod: called for the training stage only, between key sharing and masking."""
    partition = int(context.node_config.get("partition-id", 0))
    phase = str(msg.content["fitins.config"]["phase"])
    if partition in DROPS[phase]:
        raise DroppedOut(f"partition {partition} drops out of {phase}")
    return call_next(msg, context)


app = ClientApp()
app.query()(describe)
app.train("pretrain")(train)
app.train("finetune")(train)
app.train(mods=[secaggplus_mod, _drop])(train_secure)
app.evaluate("finetune")(evaluate)
app.evaluate("test")(final_test)
