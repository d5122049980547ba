"""A training round through secure aggregation (SecAgg+): the server learns the sum of the sites' weighted
changes and each site's metrics, never one site's weights.

Flower offers SecAgg+ in its legacy API only: `SecAggPlusWorkflow` runs a round's four stages (public
keys, encrypted key shares, masked vectors, unmasking) against a `LegacyContext` whose legacy strategy says
whom to ask and with what (`configure_fit`) and hears the unmasked mean (`aggregate_fit`). `SecureRound` is
that strategy for one round of ours: it asks the sites `FedRetina` sampled, sends the round's spec and
weights as the fit instructions, and keeps what comes back for `FedRetina.conclude_secure`. The workflow
returns without raising when it halts (fewer sites than the reconstruction threshold left); a round whose
`aggregate_fit` was never called is that case.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat import LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from server.directory import SiteInfo
from server.strategy import FedRetina, SecureResult
from shared.federation.securesum import SecureLayout, secure_layout
from shared.federation.wire import LAYOUT, SECAGG_SCALE, RoundSpec, pack, to_wire


def secure_round(
    strategy: FedRetina, rnd: int, arrays: ArrayRecord, grid: Grid, context: Context
) -> ArrayRecord | None:
    """Round `rnd` of `strategy`'s phase through SecAgg+: the new global weights, or None when the round is
    short (too few sites, the protocol halted); what happened is in the run store either way."""
    f = strategy.federation
    sites = strategy.start_round(rnd, arrays, grid)
    spec = RoundSpec(strategy.run, strategy.phase, rnd, strategy.tasks)
    layout = secure_layout(strategy.reference, spec, scale=max((s.images for s in sites), default=1))
    adapter = SecureRound(spec, sites, layout, strategy.reference, grid, context.run_id)
    legacy = LegacyContext(context, ServerConfig(num_rounds=1), adapter)
    legacy.state = RecordDict(  # the workflow's own bookkeeping, kept out of the ServerApp's state
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd}),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        }
    )
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every sampled site is every other's neighbour (all of them at <= 100 sites)
        reconstruction_threshold=f.secagg_threshold,
        max_weight=1.0,  # each site sends weight 1: the real weights travel inside the vector
        clipping_range=f.secagg_clipping_range,
        timeout=f.reply_timeout_s,
    )
    workflow(grid, legacy)
    return strategy.conclude_secure(rnd, SecureResult(layout, adapter.results))


class SecureRound(LegacyStrategy):
    """The legacy strategy SecAgg+'s workflow drives, for one round: it only asks and listens."""

    def __init__(
        self,
        spec: RoundSpec,
        sites: list[SiteInfo],
        layout: SecureLayout,
        reference: dict,
        grid: Grid,
        run_id: int,
    ) -> None:
        self.spec, self.sites, self.layout, self.reference = spec, sites, layout, reference
        self.grid, self.run_id = grid, run_id
        self.results: list[tuple[int, FitRes]] | None = None  # None until the sum is unmasked

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        buffer, layout = pack(self.reference)
        config = {**to_wire(self.spec), LAYOUT: layout, SECAGG_SCALE: self.layout.scale}
        fitins = FitIns(ndarrays_to_parameters([buffer]), config)
        return [(GridClientProxy(s.node_id, self.grid, self.run_id), fitins) for s in self.sites]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list
    ) -> tuple[Parameters | None, dict]:
        self.results = [(int(proxy.node_id), fitres) for proxy, fitres in results]
        return None, {}  # the new model is FedRetina's to compute and keep

    # The workflow calls nothing else; a legacy strategy must still define these.
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list, failures: list
    ) -> tuple[float | None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict] | None:
        return None
