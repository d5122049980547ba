"""Recompute a federated run's final weights from its run store: the audit that the store is an exact
account of the run, faults included.

Each round, the sites whose train replies the store marks as aggregated are trained again with
`client/rounds.py:train_round` (the ClientApp's own function): from the previous global model, then
averaged as the server averages; under cyclic weight transfer one after another in the round's
`cycle_order`, each from the previous one's model (and, with `carry_optimizer`, its optimiser moments).
Sites that failed, timed out or were rejected contribute nothing, as in the run. The replay needs every
site's data in one place, so it is for test federations and audits of pooled data.

Exact for FedAvg, FedProx and cyclic weight transfer. A site's optimiser state
(`federation.keep_optimizer_state`) comes from its previous round: a straggler that trained a round whose
reply came too late carries that round's state on, which the server never saw; replays of such runs are
exact with `keep_optimizer_state: false`.
Private runs are refused: their noise and sampling come from each site's own entropy.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from client.rounds import train_round
from server.checkpoints import Checkpoints
from server.run import initial_weights
from server.store import StoreReader
from shared.config import ExperimentConfig
from shared.data.scenario import load_scenario, scenario_sites
from shared.data.site import Site, load_site
from shared.errors import ConfigError
from shared.federation.aggregation import Arrays, Chain, Update, average, cycle_order, site_update
from shared.federation.strategies import STRATEGIES, strategy_of
from shared.federation.wire import FINETUNE, PRETRAIN, RoundSpec, RunSpec


def replay(federation_dir: Path, site_yamls: list[Path] = ()) -> dict[str, tuple[Arrays, Arrays]]:
    """Phase -> (replayed final global weights, the run's own final checkpoint), for each phase run. The
    sites are a simulation's scenario sites, or the given site YAMLs for a deployment."""
    store = StoreReader(federation_dir / "store.sqlite")
    run = store.run()
    if run is None:
        raise ConfigError(f"{federation_dir}: the run store holds no run to replay")
    cfg = ExperimentConfig.model_validate_json(run["config"])
    if not strategy_of(cfg.federation.strategy).replayable:
        known = ", ".join(name for name, s in STRATEGIES.items() if s.replayable)
        raise ConfigError(
            f"replay covers {known}, not {cfg.federation.strategy} (its server state is not stored)"
        )
    if cfg.privacy.enabled:
        raise ConfigError(
            "replay: a private run is not replayable (its sites' noise and sampling are secret)"
        )
    scenario = run["scenario"] if run["scenario"] != "deployment" else ""
    spec = RunSpec(cfg, run["run_uid"], scenario)
    real = (
        scenario_sites(load_scenario(scenario), cfg.seed) if scenario else [load_site(p) for p in site_yamls]
    )
    checkpoints = Checkpoints(federation_dir / "checkpoints")
    out: dict[str, tuple[Arrays, Arrays]] = {}
    with tempfile.TemporaryDirectory(prefix="fedretina-replay-") as scratch:
        sites = {s.name: _scratch_site(s, Path(scratch)) for s in real}
        pretrained = None
        for phase in (PRETRAIN, FINETUNE):
            accounts = _aggregated(store, phase)
            if not accounts:
                continue
            final = checkpoints.load(phase, max(accounts))
            tasks = final.meta.get("tasks") or {}
            arrays, carried = initial_weights(cfg, phase, tasks, pretrained), {}
            for rnd in sorted(accounts):
                round_spec, trained = RoundSpec(spec, phase, rnd, tasks), [sites[n] for n in accounts[rnd]]
                arrays, carried = _round(round_spec, arrays, carried, trained)
            out[phase] = (arrays, final.arrays)
            pretrained = arrays
    return out


def _round(spec: RoundSpec, arrays: Arrays, carried: Arrays, sites: list[Site]) -> tuple[Arrays, Arrays]:
    """One round as the server aggregated it, and the optimiser moments cyclic weight transfer carries on
    (`carry_optimizer`); a round nobody was aggregated in keeps both."""
    f = spec.config.federation
    plan = strategy_of(f.strategy)
    if plan.sequential:
        chain, by_name = Chain(arrays, carried), {s.name: s for s in sites}
        for name in cycle_order(by_name, spec.config.seed, spec.phase, spec.round):
            moments = _tensors(chain.moments) if f.carry_optimizer else None
            chain.add(*_trained(by_name[name], spec, _tensors(chain.model), moments))
        return chain.result(), chain.moments
    start = _tensors(arrays)
    updates = [_trained(site, spec, start)[0] for site in sites]
    return (plan.combine(updates, arrays, f) if plan.combine else average(updates, arrays)), carried


def _tensors(arrays: Arrays) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


def _trained(
    site: Site,
    round_spec: RoundSpec,
    tensors: dict[str, torch.Tensor],
    carried: dict[str, torch.Tensor] | None = None,
) -> tuple[Update, Arrays]:
    """The site's update (and the moments it hands on) when it trains the round from `tensors`, as the
    ClientApp trains it."""
    trained = train_round(site, round_spec, tensors, carried)
    assert trained.weights is not None  # only private runs refuse, and they are not replayed
    weights = {k: v.numpy() for k, v in trained.weights.items()}
    moments = {k: v.numpy() for k, v in (trained.moments or {}).items()}
    return site_update(site.name, weights, trained.metrics, round_spec.tasks), moments


def _aggregated(store: StoreReader, phase: str) -> dict[int, list[str]]:
    """Round -> the sites whose train replies were averaged into its global model (every round the run
    finished appears, with no site when it was skipped)."""
    accounts: dict[int, list[str]] = {int(r["round"]): [] for r in store.rounds(phase, finished=True)}
    for row in store.replies(phase, "train"):
        if row["aggregated"]:
            accounts[int(row["round"])].append(row["site"])
    return {r: sorted(names) for r, names in accounts.items()}


def _scratch_site(site: Site, scratch: Path) -> Site:
    """The site with its state (optimiser moments, cache) in a scratch folder, so the replay starts from
    what the run started from and never touches the site's own state."""
    config = site.config.model_copy(update={"state_dir": scratch / site.name})
    return Site(site.name, config, site.rows)
