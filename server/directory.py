"""Which sites are in the federation: a `query` round maps Flower node ids to site names, tasks and sizes,
and our own deadline replaces Flower's wait-forever for sites that never connect."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from server.store import RunStore
from shared.errors import ConfigError, UserError
from shared.federation.wire import REPORT, SPEC, RunSpec, SiteReport, from_wire, to_wire

log = logging.getLogger(__name__)
POLL_S = 1.0


class FederationError(UserError):
    """The federation cannot proceed (too few sites within the deadline, nothing left to aggregate)."""

    exit_code = 5


@dataclass(frozen=True)
class SiteInfo:
    node_id: int
    name: str
    partition: int
    images: int
    labelled: dict[str, int]  # task -> labelled images
    classes: dict[str, int]  # task -> number of classes


class SiteDirectory:
    def __init__(
        self,
        store: RunStore,
        run: RunSpec,
        *,
        expected: int,
        min_sites: int,
        deadline_s: float,
        timeout_s: float,
    ):
        self.store, self.run, self.expected, self.min_sites = store, run, expected, min_sites
        self.deadline_s, self.timeout_s = deadline_s, timeout_s
        self.known: dict[int, SiteInfo] = {}
        self.failed: set[int] = set()  # nodes that could not say which site they are (not asked again)

    def name(self, node_id: int) -> str:
        info = self.known.get(node_id)
        return info.name if info else f"node-{node_id}"

    def refresh(self, grid: Grid, timeout_s: float | None = None) -> None:
        """Ask every connected node not yet known who it is (waiting at most `timeout_s` for answers)."""
        unknown = [n for n in grid.get_node_ids() if n not in self.known and n not in self.failed]
        if not unknown:
            return
        content = RecordDict({SPEC: ConfigRecord(to_wire(self.run))})
        messages = [Message(content, dst_node_id=n, message_type="query") for n in sorted(unknown)]
        wait = self.timeout_s if timeout_s is None else min(self.timeout_s, timeout_s)
        for reply in grid.send_and_receive(messages, timeout=wait):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.store.event(
                    "site-error", f"node {node} could not describe its site: {error_text(reply)}", "error"
                )
                self.failed.add(node)
                continue
            try:
                report = from_wire(SiteReport, reply.content[REPORT])
            except ConfigError as exc:  # a site of another version: leave it out, not the whole run
                self.store.event("site-error", f"node {node}: {exc}", "error")
                self.failed.add(node)
                continue
            info = SiteInfo(
                node, report.site, report.partition, report.images, report.labelled, report.classes
            )
            self.known[node] = info
            self.store.add_site(node, info.name, info.partition, info.images, list(info.labelled))
            log.info(
                "site %s joined (node %s): %d images, labels %s",
                info.name,
                node,
                info.images,
                info.labelled or "none",
            )

    def wait(
        self, grid: Grid, eligible: Callable[[SiteInfo], bool] = lambda s: True, needed: int | None = None
    ) -> list[SiteInfo]:
        """Connected, known, eligible sites sorted by name, once `expected` nodes are here or the deadline
        passes; fewer than `needed` (default min_sites) by then is a recorded, one-line failure."""
        needed = self.min_sites if needed is None else needed
        deadline, reported = time.monotonic() + self.deadline_s, -1
        while True:
            self.refresh(grid, max(POLL_S, deadline - time.monotonic()))  # a silent node cannot outlast it
            connected = set(grid.get_node_ids())
            live = sorted(
                (s for n, s in self.known.items() if n in connected and eligible(s)), key=lambda s: s.name
            )
            answered = connected & (set(self.known) | self.failed)  # a node that failed will not recover
            if len(answered) >= self.expected and len(live) >= needed:
                return live
            if time.monotonic() >= deadline:
                if len(live) >= needed:
                    log.warning(
                        "deadline passed with %d of %d sites: continuing with %s",
                        len(connected),
                        self.expected,
                        ", ".join(s.name for s in live),
                    )
                    return live
                message = (
                    f"only {len(live)} eligible site(s) connected within {self.deadline_s:.0f} s "
                    f"({', '.join(s.name for s in live) or 'none'}); at least {needed} needed"
                )
                self.store.event("deadline", message, "error")
                raise FederationError(message)
            if len(connected) != reported:  # one line per change, not one per poll
                log.info("waiting for sites: %d of %d connected", len(connected), self.expected)
                reported = len(connected)
            time.sleep(POLL_S)


def sample_sites(sites: list[SiteInfo], fraction: float, seed: int, at_least: int = 1) -> list[SiteInfo]:
    """`fraction` of `sites` (rounded up, at least `at_least`), drawn by `seed`, sorted by name."""
    if fraction >= 1.0:
        return sites
    k = min(len(sites), max(at_least, math.ceil(fraction * len(sites))))
    picked = np.random.default_rng(seed).choice(len(sites), size=k, replace=False)
    return sorted((sites[i] for i in picked), key=lambda s: s.name)


def error_text(reply: Message) -> str:
    """An error reply in one line: Flower's code by name, then the last line of its reason (the exception
    at the end of a traceback, an exception's own message without Flower's `<class ...>:<'...'>` wrapping)."""
    code = int(reply.error.code)
    names = {v: k for k, v in vars(ErrorCode).items() if k.isupper() and isinstance(v, int)}
    text = re.sub(r"\x1b\[[0-9;]*m", "", reply.error.reason)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    last = re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>$", r"\1: \2", last).removesuffix("'>")
    return f"error reply {names.get(code, 'UNKNOWN')} ({code}): {last}"
