"""A whole federated run inside one ServerApp: site discovery, phase 1 (SparK pretraining on every site),
the encoder export, phase 2 (fine-tuning on the sites that hold each task's labels), and the summary.

The run drives the rounds itself, calling the strategy's Flower hooks in `Strategy.start`'s order, so that
what happens after a round (the probe on public images, the checkpoint, the console line) belongs to the
run rather than to an evaluate callback, and a resumed run simply starts its loop later.

Outputs in `runs/<run-name>/federation/`: store.sqlite (the run store), checkpoints/ (every round),
probes/ (reconstruction PNGs of the public probe images), encoder.safetensors (after phase 1),
model.safetensors (after phase 2), summary.md, log.txt (every detail; the console shows a line per round).

Resume (`resume = true` in the run config): the newest checkpoint is the starting point; rounds after it are
forgotten in the store and run again. Settings that shape the result must be the checkpoint's (each one that
changed is named). Without resume, a run directory that already holds checkpoints is refused rather than
overwritten.
"""

from __future__ import annotations

import logging
import resource
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid

from server.checkpoints import Checkpoints, Saved
from server.directory import FederationError, SiteDirectory, SiteInfo
from server.public_probe import probe_batch, probe_spark
from server.recorder import Recorder
from server.replies import stream_replies
from server.report import round_line, summary_table
from server.secure import secure_round
from server.store import RunStore, StoreReader
from server.strategy import TEST, FedRetina, cross_site_kind, to_record
from server.tracking import LiveTracking
from shared.config import ExperimentConfig, RunOptions
from shared.data.scenario import load_scenario
from shared.federation.aggregation import Arrays
from shared.federation.strategies import strategy_of
from shared.federation.wire import FINETUNE, PRETRAIN, RunSpec
from shared.models import ENCODER
from shared.rundir import atomic_write_text, run_dir, start_run_dir
from shared.training.checkpoint import export_encoder
from shared.training.initialisation import (
    FINETUNE_SEED,
    finetuning_start,
    pretraining_start,
    read_encoder_export,
)
from shared.training.pretrain import build_spark
from shared.weights import check_meta, check_settings, load_into, load_weights, save_weights, weights_meta

log = logging.getLogger(__name__)
CHECKPOINT = "federated-checkpoint"
# Settings only the centralised commands read: free to differ when a federated run continues.
CENTRALISED_ONLY = (
    "sites",
    "pretrain.epochs",
    "finetune.protocol",
    "finetune.task",
    "finetune.inits",
    "finetune.epochs",
    "finetune.folds",
    "finetune.run_folds",
    "finetune.label_fractions",
    "finetune.select_metric",
    "finetune.early_stopping",
    "finetune.bootstrap",
)


def check_resumable(path: Path, meta: dict, cfg: ExperimentConfig, options: RunOptions) -> None:
    """Refuse to continue the run of checkpoint `path` with another scenario or with any setting that
    shapes the result changed (rounds, strategy, model, seeds, ...), naming what changed."""
    check_meta(path, meta, {"kind": CHECKPOINT, "scenario": options.scenario})
    check_settings(path, meta, cfg, free=CENTRALISED_ONLY)


def rounds_done(saved: Saved | None, phase: str, total: int) -> int:
    """How many of `phase`'s `total` rounds a resumed run has done: up to the saved round in the saved
    phase, all of phase 1 once the checkpoint is phase 2's, none of phase 2 while it is phase 1's."""
    if saved is None:
        return 0
    if saved.phase == phase:
        return saved.round
    return total if phase == PRETRAIN else 0


def initial_weights(
    cfg: ExperimentConfig, phase: str, tasks: dict[str, int], pretrained: Arrays | None
) -> Arrays:
    """A phase's starting weights: the seeded SparK model (phase 1), or seeded heads on the phase-1 encoder
    (phase 2; a seeded encoder without phase 1) — what `fedretina pretrain` / `finetune` start from."""
    if phase == PRETRAIN:
        return _numpy(pretraining_start(cfg).state_dict())
    state = _numpy(finetuning_start(cfg, tasks, FINETUNE_SEED).state_dict())
    return state | {k: v for k, v in (pretrained or {}).items() if k.startswith(ENCODER)}


def _given_encoder(cfg: ExperimentConfig) -> Arrays | None:
    """`federation.start_encoder` as phase 2's encoder entries (checked against the model first)."""
    path = cfg.federation.start_encoder
    if not path:
        return None
    tensors, _ = read_encoder_export(Path(path), cfg.model)
    return {ENCODER + k: v.numpy() for k, v in tensors.items()}


def phase2_tasks(wanted: tuple[str, ...], sites: list[SiteInfo]) -> dict[str, int]:
    """Phase 2's tasks and class counts: `wanted`, or every task a site holds labels for."""
    held: dict[str, int] = {}
    for site in sites:
        for task, classes in site.classes.items():
            if held.setdefault(task, classes) != classes:
                raise FederationError(
                    f"task {task}: sites disagree on its classes ({held[task]} vs {classes})"
                )
    missing = [t for t in wanted if t not in held]
    if missing:
        raise FederationError(f"federation.tasks: no connected site holds labels for {missing}")
    return {t: held[t] for t in wanted or sorted(held)}


class FederatedRun:
    def __init__(self, grid: Grid, cfg: ExperimentConfig, options: RunOptions, context: Context) -> None:
        # Bad settings are refused before anything is written (the run folder, its store).
        if cfg.pretrain.method != "spark":
            raise FederationError(
                f"pretrain.method: federated phase 1 is SparK; {cfg.pretrain.method} pretraining is "
                "centralised (fedretina pretrain)"
            )
        f = cfg.federation
        self.expected = (
            load_scenario(options.scenario).size if options.scenario else max(f.expected_sites, f.min_sites)
        )
        self.grid, self.cfg, self.options, self.context = grid, cfg, options, context
        self.dir = run_dir(cfg, "federation", options.run_name)
        self.store = RunStore(self.dir / "store.sqlite", options.run_name)
        self.reader = StoreReader(self.store.path)
        self.checkpoints = Checkpoints(self.dir / "checkpoints", cfg.federation.keep_checkpoints)
        t = cfg.tracking
        self.tracking = LiveTracking(t.mlflow_uri, t.experiment, Path(cfg.runs_dir), self.dir)
        self._probes: tuple[torch.Tensor, torch.Tensor] | None = None

    def execute(self) -> None:
        saved = self._starting_point()
        start_run_dir(self.cfg, "federation", self.options.run_name)
        uid = str(saved.meta["run_uid"]) if saved else uuid.uuid4().hex[:12]
        self.spec = RunSpec(self.cfg, uid, self.options.scenario)
        f = self.cfg.federation
        self.directory = SiteDirectory(
            self.store,
            self.spec,
            expected=self.expected,
            min_sites=f.min_sites,
            deadline_s=f.connect_deadline_s,
            timeout_s=f.reply_timeout_s,
        )
        scenario = self.options.scenario or "deployment"
        self.store.start_run(uid, self.context.run_id, scenario, f.strategy, self.cfg.model_dump(mode="json"))
        resumed = f", resumed after {saved.phase} round {saved.round}" if saved else ""
        self.store.event("start", f"Flower run {self.context.run_id}{resumed}")
        try:
            self._check_simulation_size()
            self.directory.wait(self.grid)
            self._finetune(saved, self._pretrain(saved))
        except BaseException as exc:
            self.store.event("failed", f"{type(exc).__name__}: {exc}", "error")
            self.store.finish_run("failed")
            self.tracking()
            raise
        table = summary_table(self.reader)
        atomic_write_text(self.dir / "summary.md", table)
        self.store.finish_run("completed")
        self.tracking()
        log.info("federated run finished; run store %s\n%s", self.store.path, table)

    def _check_simulation_size(self) -> None:
        """In simulation every node exists from the start: a node count unlike the scenario's is a user error
        to report at once, not something to wait out."""
        if not self.options.scenario:
            return
        nodes, sites = len(list(self.grid.get_node_ids())), self.expected
        hint = f'run `flwr run . --federation-config "num-supernodes={sites}"`'
        if nodes < sites:
            message = (
                f"scenario {self.options.scenario!r} has {sites} sites, the simulation {nodes} nodes; {hint}"
            )
            self.store.event("size", message, "error")
            raise FederationError(message)
        if nodes > sites:
            log.warning(
                "the simulation has %d nodes for %d scenario sites: the extra nodes stay idle (%s)",
                nodes,
                sites,
                hint,
            )

    def _starting_point(self) -> Saved | None:
        saved = self.checkpoints.latest()
        if saved is None:
            return None
        path = self.checkpoints.path(saved.phase, saved.round)
        if not self.options.resume:
            raise FederationError(
                f"{self.dir} already holds checkpoints (last: {saved.phase} round {saved.round}); "
                "set resume=true to continue that run, or choose another run-name"
            )
        check_resumable(path, saved.meta, self.cfg, self.options)
        self.store.forget_after(saved.phase, saved.round)
        log.info("resuming after %s round %d", saved.phase, saved.round)
        return saved

    def _pretrain(self, saved: Saved | None) -> Arrays | None:
        total = self.cfg.federation.rounds_pretrain
        if total == 0:
            return _given_encoder(self.cfg)
        self._run_phase(PRETRAIN, {}, saved, None)
        final = self.checkpoints.load(PRETRAIN, total).arrays
        encoder = {k.removeprefix(ENCODER): v for k, v in _tensors(final).items() if k.startswith(ENCODER)}
        export_encoder(self.dir / "encoder.safetensors", encoder, self.cfg, rounds=total, federated=True)
        return final

    def _finetune(self, saved: Saved | None, pretrained: Arrays | None) -> None:
        total = self.cfg.federation.rounds_finetune
        wanted = self.cfg.federation.tasks
        tasks = phase2_tasks(wanted, list(self.directory.known.values())) if total else {}
        if not tasks:
            log.info("no fine-tuning phase (%s)", "0 rounds" if total == 0 else "no site holds labels")
            return
        if saved is not None and saved.phase == FINETUNE and saved.meta.get("tasks") != tasks:
            raise FederationError(
                f"the checkpoint's phase 2 fine-tunes {saved.meta.get('tasks')}, the connected sites give "
                f"{tasks}: wait for the missing sites (federation.connect_deadline_s) or start another run"
            )
        self._run_phase(FINETUNE, tasks, saved, pretrained)
        final = self.checkpoints.load(FINETUNE, total).arrays
        save_weights(
            self.dir / "model.safetensors", _tensors(final), weights_meta(self.cfg, "task-model", tasks=tasks)
        )
        self._final_test(tasks, total, final)

    def _final_test(self, tasks: dict[str, int], total: int, final: Arrays) -> None:
        """Every site that holds labels scores the final model on its own held-out test patients (never
        trained on, never used to choose a round); the scores are stored and summarised per site. Under
        `federation.cross_site`, every site then scores each site's last local model the same way."""
        strategy = FedRetina(self.spec, FINETUNE, tasks, self.directory, Recorder(self.store, FINETUNE))
        models = {TEST: final}
        if self.cfg.federation.cross_site:
            for path in sorted(self.local_models.glob("*.safetensors")):
                models[cross_site_kind(path.stem)] = {k: v.numpy() for k, v in load_weights(path)[0].items()}
        timeout = self.cfg.federation.reply_timeout_s
        for kind, model in models.items():
            asked = list(strategy.configure_test(total, to_record(model), self.grid))
            strategy.aggregate_test(total, stream_replies(self.grid, asked, timeout), kind)

    @property
    def local_models(self) -> Path:
        """The sites' own models of phase 2's last round (`federation.cross_site`)."""
        return self.dir / "local"

    def _run_phase(
        self, phase: str, tasks: dict[str, int], saved: Saved | None, pretrained: Arrays | None
    ) -> None:
        """The phase's rounds after those `saved` already holds (all of them when it is a later phase's)."""
        total = (
            self.cfg.federation.rounds_pretrain if phase == PRETRAIN else self.cfg.federation.rounds_finetune
        )
        done = rounds_done(saved, phase, total)
        if done >= total:
            return
        mine = saved is not None and saved.phase == phase
        start = saved.arrays if mine else initial_weights(self.cfg, phase, tasks, pretrained)
        adam, carried = (saved.adam, saved.carried) if mine else (None, None)
        recorder = Recorder(self.store, phase)
        strategy = FedRetina(self.spec, phase, tasks, self.directory, recorder, adam, carried)
        strategy.summary()
        arrays = to_record(start)
        loss = self._probe(phase, 0, arrays) if done == 0 else None
        if loss is not None:
            log.info("%s round 0/%d: probe %.4f (the starting model)", phase, total, loss)
        for rnd in range(done + 1, total + 1):
            if phase == FINETUNE and rnd == total and self.cfg.federation.cross_site:
                shutil.rmtree(self.local_models, ignore_errors=True)  # an earlier attempt's
                strategy.local_models = self.local_models
            arrays = self._round(strategy, rnd, arrays)
            log.info(round_line(self.reader, phase, rnd, total))
            self.tracking()

    def _round(self, strategy: FedRetina, rnd: int, arrays: ArrayRecord) -> ArrayRecord:
        """One round: Flower's hooks in `Strategy.start`'s order, then the probe and the checkpoint."""
        arrays = self._train(strategy, rnd, arrays)
        self.store.add_metrics(strategy.phase, rnd, "server", {"peak-rss-mb": peak_rss_mb()})
        timeout = self.cfg.federation.reply_timeout_s
        asked = strategy.configure_evaluate(rnd, arrays, ConfigRecord(), self.grid)
        strategy.aggregate_evaluate(rnd, stream_replies(self.grid, list(asked), timeout))
        self._probe(strategy.phase, rnd, arrays)
        meta = weights_meta(
            self.cfg,
            CHECKPOINT,
            run_uid=self.spec.run_uid,
            scenario=self.options.scenario,
            tasks=strategy.tasks,
        )
        path = self.checkpoints.save(
            strategy.phase, rnd, _numpy(arrays), strategy.adam, meta, strategy.carried
        )
        self.store.add_checkpoint(strategy.phase, rnd, path)
        return arrays

    def _train(self, strategy: FedRetina, rnd: int, arrays: ArrayRecord) -> ArrayRecord:
        """The round's training: the new global model, or the old one when too few sites answered and
        `short_round` is "skip"; under "wait" such a round is tried again (the same seeds, so the same
        updates), up to `round_attempts` times."""
        f = self.cfg.federation
        strategy.recorder.attempt = 1
        while True:
            if f.secure_aggregation:
                new = secure_round(strategy, rnd, arrays, self.grid, self.context)
            elif strategy_of(f.strategy).sequential:
                new = strategy.cyclic_round(rnd, arrays, self.grid, f.reply_timeout_s)
            else:
                asked = strategy.configure_train(rnd, arrays, ConfigRecord(), self.grid)
                new, _ = strategy.aggregate_train(
                    rnd, stream_replies(self.grid, list(asked), f.reply_timeout_s)
                )
            if new is not None or f.short_round == "skip":
                return new if new is not None else arrays
            if strategy.recorder.attempt >= f.round_attempts:
                raise FederationError(
                    f"{strategy.phase} round {rnd}: fewer than {f.min_sites} accepted update(s) in "
                    f"{f.round_attempts} attempts; fix the sites, then resume the run"
                )
            strategy.recorder.retrying(rnd, f.round_attempts)

    def _probe(self, phase: str, rnd: int, arrays: ArrayRecord) -> float | None:
        """Phase 1: the global model's masked-patch loss on public images, and its reconstruction PNG."""
        if phase != PRETRAIN:
            return None
        if self._probes is None:
            self._probes = probe_batch(self.cfg.data.image_size)
        model = build_spark(self.cfg)
        load_into(model, arrays.to_torch_state_dict(), Path("global model"))
        loss = probe_spark(model, *self._probes, self.dir / "probes" / f"pretrain-r{rnd:04d}.png")
        self.store.add_metrics(phase, rnd, "server-probe", {"probe-loss": loss})
        return loss


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB): the server's footprint, which folding replies as
    they arrive keeps flat in the number of sites."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _numpy(state: Mapping[str, torch.Tensor] | ArrayRecord) -> Arrays:
    return {k: v.numpy() for k, v in state.items()}


def _tensors(arrays: Arrays) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
