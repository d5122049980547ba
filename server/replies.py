"""A round's replies as they land: push the messages, then pull each reply on its own as soon as it is there.

Flower's `Grid.send_and_receive` returns every reply at once, so the server would hold every site's weights
together (N x the model). Pulling one message id at a time and yielding the reply lets the strategy
validate it, fold it into its running sums and drop it before the next: the server holds one reply at a
time, whatever the number of sites. Polling starts fast and backs off while nothing lands, so a round's end
is seen within a fraction of a second rather than Flower's fixed 3 s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from flwr.app import Message
from flwr.serverapp import Grid

POLL_FIRST_S, POLL_MAX_S = 0.1, 2.0


def stream_replies(grid: Grid, messages: list[Message], timeout: float) -> Iterator[Message]:
    """Push `messages` now (so their ids are set before anyone reads them), then return an iterator that
    yields each reply when it lands, until every message is answered or `timeout` seconds have passed
    (unanswered messages are then the caller's timeouts)."""
    pending = list(grid.push_messages(messages))
    return _replies(grid, pending, time.monotonic() + timeout)


def _replies(grid: Grid, pending: list[str], end: float) -> Iterator[Message]:
    wait = POLL_FIRST_S
    while pending and time.monotonic() < end:
        landed = False
        for message_id in list(pending):
            for reply in grid.pull_messages([message_id]):
                if reply.metadata.reply_to_message_id in pending:
                    pending.remove(reply.metadata.reply_to_message_id)
                landed = True
                yield reply
        wait = POLL_FIRST_S if landed else min(2 * wait, POLL_MAX_S)
        if pending and not landed:
            time.sleep(min(wait, max(0.0, end - time.monotonic())))
