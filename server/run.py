"""A whole federated run inside one ServerApp: site discovery, phase 1 (SparK pretraining on every site),
the encoder export, phase 2 (fine-tuning on the sites that hold each task's labels), and the summary.

Outputs in `runs/<run-name>/federation/`: store.sqlite (the run store), checkpoints/ (every round),
probes/ (reconstruction PNGs of the public probe images), encoder.safetensors (after phase 1),
model.safetensors (after phase 2), summary.md.

Resume (`resume = true` in the run config): the newest checkpoint is the starting point; rounds after it are
forgotten in the store and run again. Without resume, a run directory that already holds checkpoints is
refused rather than overwritten.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.serverapp import Grid

from server.checkpoints import Checkpoints, Saved
from server.probe import probe_batch, probe_spark
from server.report import summary_table
from server.sites import FederationError, SiteDirectory
from server.store import RunStore
from server.strategy import FedRetina, PhasePlan, encoder_arrays, to_record
from shared.aggregation import Arrays, FedAdamState
from shared.config import ExperimentConfig, RunOptions
from shared.data.scenario import load_scenario
from shared.rundir import atomic_write_text, run_dir, start_run_dir
from shared.seeding import derive_seed, seed_everything
from shared.training.finetune import build_task_model
from shared.training.init import pretraining_start
from shared.training.pretrain import build_spark
from shared.weights import load_into, model_meta, save_weights

log = logging.getLogger(__name__)


def run_identity(cfg: ExperimentConfig) -> dict:
    """The settings a resumed run must share with its checkpoints (anything else would mix two runs)."""
    f = cfg.federation
    return {
        **model_meta(cfg.model),
        "seed": cfg.seed,
        "strategy": f.strategy,
        "local_epochs": f.local_epochs,
        "local_steps": f.local_steps,
        "image_size": cfg.data.image_size,
        "decoder_width": cfg.pretrain.decoder_width,
    }


def initial_spark(cfg: ExperimentConfig) -> Arrays:
    """Phase 1's starting weights: the seeded SparK model (the centralised reference builds the same)."""
    return {k: v.numpy() for k, v in pretraining_start(cfg).state_dict().items()}


def initial_task_model(cfg: ExperimentConfig, tasks: dict[str, int], pretrained: Arrays | None) -> Arrays:
    """Phase 2's starting weights: seeded heads on the phase-1 encoder (a seeded encoder without phase 1)."""
    seed_everything(derive_seed(cfg.seed, "init-finetune"))
    state = {k: v.numpy() for k, v in build_task_model(cfg, tasks).state_dict().items()}
    if pretrained is not None:
        state |= encoder_arrays(pretrained)
    return state


class FederatedRun:
    def __init__(self, grid: Grid, cfg: ExperimentConfig, options: RunOptions, flower_run_id: int) -> None:
        # Bad settings are refused before anything is written (the run folder, its store).
        if cfg.pretrain.method != "spark":
            raise FederationError(
                "pretrain.method: federated phase 1 is SparK; MoCo pretraining is centralised"
            )
        f = cfg.federation
        expected = load_scenario(options.scenario).size if options.scenario else f.min_sites
        self.grid, self.cfg, self.options = grid, cfg, options
        self.dir = run_dir(cfg, "federation", options.run_name)
        self.store = RunStore(self.dir / "store.sqlite", options.run_name)
        self.checkpoints = Checkpoints(self.dir / "checkpoints", f.keep_checkpoints)
        self.flower_run_id = flower_run_id
        self.run_uid = uuid.uuid4().hex[:12]  # replaced by the checkpoints' own on resume
        self.directory = SiteDirectory(
            self.store,
            expected=expected,
            min_sites=f.min_sites,
            deadline_s=f.connect_deadline_s,
            timeout_s=f.reply_timeout_s,
        )
        self._probe: tuple | None = None

    def execute(self) -> None:
        saved = self._starting_point()
        start_run_dir(self.cfg, "federation", self.options.run_name)
        f = self.cfg.federation
        self.store.start_run(
            self.options.run_name,
            self.options.scenario or "deployment",
            f.strategy,
            self.cfg.model_dump(mode="json"),
        )
        self.store.event(
            "start",
            f"Flower run {self.flower_run_id}"
            + (f", resumed after {saved.phase} round {saved.round}" if saved else ""),
        )
        try:
            self._check_simulation_size()
            self.directory.wait(self.grid)
            pretrained = self._pretrain(saved)
            self._finetune(saved, pretrained)
        except BaseException as exc:
            self.store.event("failed", f"{type(exc).__name__}: {exc}", "error")
            self.store.finish_run("failed")
            raise
        table = summary_table(self.store)
        atomic_write_text(self.dir / "summary.md", table)
        self.store.finish_run("completed")
        log.info("federated run finished; run store %s\n%s", self.store.path, table)

    def _check_simulation_size(self) -> None:
        """In simulation every node exists from the start: a node count unlike the scenario's is a user error
        to report at once, not something to wait out."""
        if not self.options.scenario:
            return
        nodes, sites = len(list(self.grid.get_node_ids())), self.directory.expected
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
        if not self.options.resume:
            raise FederationError(
                f"{self.dir} already holds checkpoints (last: {saved.phase} round {saved.round}); "
                "set resume=true to continue that run, or choose another run-name"
            )
        identity = run_identity(self.cfg)
        differs = [
            f"{k}={saved.meta.get(k)!r} (now {v!r})" for k, v in identity.items() if saved.meta.get(k) != v
        ]
        if differs:
            raise FederationError(
                f"{self.checkpoints.path(saved.phase, saved.round)} was made with other settings: "
                f"{', '.join(differs)}; resume with the run's own settings, or start another run"
            )
        self.store.forget_after(saved.phase, saved.round)
        self.run_uid = str(saved.meta.get("run_uid", self.run_uid))
        log.info("resuming after %s round %d", saved.phase, saved.round)
        return saved

    def _pretrain(self, saved: Saved | None) -> Arrays | None:
        total = self.cfg.federation.rounds_pretrain
        if total == 0:
            return None
        done = total if saved and saved.phase == "finetune" else (saved.round if saved else 0)
        if done < total:
            start = saved.arrays if saved and saved.phase == "pretrain" else initial_spark(self.cfg)
            adam = saved.adam if saved and saved.phase == "pretrain" else None
            plan = PhasePlan(
                "pretrain", done, total, {}, self.options.run_name, self.run_uid, run_identity(self.cfg)
            )
            self._run_phase(plan, start, adam, probe=self._probe_pretrain)
        final = self.checkpoints.load("pretrain", total).arrays
        encoder = {k.removeprefix("encoder."): v for k, v in encoder_arrays(final).items()}
        meta = {
            **model_meta(self.cfg.model),
            "kind": "spark-encoder",
            "rounds": total,  # each: local_steps batches per site if set, else local_epochs epochs
            "local_epochs": self.cfg.federation.local_epochs,
            "local_steps": self.cfg.federation.local_steps,
            "federated": True,
            "image_size": self.cfg.data.image_size,
        }
        save_weights(self.dir / "encoder.safetensors", _tensors(encoder), meta)
        return final

    def _finetune(self, saved: Saved | None, pretrained: Arrays | None) -> None:
        total = self.cfg.federation.rounds_finetune
        tasks = self._tasks()
        if total == 0 or not tasks:
            log.info("no fine-tuning phase (%s)", "0 rounds" if total == 0 else "no site holds labels")
            return
        done = saved.round if saved and saved.phase == "finetune" else 0
        if done < total:
            start = (
                saved.arrays
                if saved and saved.phase == "finetune"
                else initial_task_model(self.cfg, tasks, pretrained)
            )
            adam = saved.adam if saved and saved.phase == "finetune" else None
            self._run_phase(
                PhasePlan(
                    "finetune",
                    done,
                    total,
                    tasks,
                    self.options.run_name,
                    self.run_uid,
                    run_identity(self.cfg),
                ),
                start,
                adam,
                probe=None,
            )
        final = self.checkpoints.load("finetune", total).arrays
        meta = {
            **model_meta(self.cfg.model),
            "kind": "task-model",
            "tasks": list(tasks),
            "classes": list(tasks.values()),
        }
        save_weights(self.dir / "model.safetensors", _tensors(final), meta)

    def _run_phase(
        self,
        plan: PhasePlan,
        start: Arrays,
        adam: FedAdamState | None,
        probe: Callable[[int, Arrays], dict[str, float]] | None,
    ) -> None:
        strategy = FedRetina(self.cfg, plan, self.directory, self.store, self.checkpoints, probe, adam)
        strategy.start(
            self.grid,
            to_record(start),
            num_rounds=plan.total - plan.offset,
            timeout=self.cfg.federation.reply_timeout_s,
            evaluate_fn=strategy.end_of_round,
        )

    def _tasks(self) -> dict[str, int]:
        """Phase 2's tasks and class counts: configured, or every task a known site holds labels for."""
        held: dict[str, int] = {}
        for site in self.directory.known.values():
            for task, classes in site.classes.items():
                if held.setdefault(task, classes) != classes:
                    raise FederationError(
                        f"task {task}: sites disagree on its classes ({held[task]} vs {classes})"
                    )
        wanted = self.cfg.federation.tasks or tuple(sorted(held))
        missing = [t for t in wanted if t not in held]
        if missing:
            raise FederationError(f"federation.tasks: no connected site holds labels for {missing}")
        return {t: held[t] for t in wanted}

    def _probe_pretrain(self, rnd: int, arrays: Arrays) -> dict[str, float]:
        if self._probe is None:
            self._probe = probe_batch(self.cfg.data.image_size)
        images, fov = self._probe
        model = build_spark(self.cfg)
        load_into(model, _tensors(arrays), Path("global model"))
        loss = probe_spark(model, images, fov, self.dir / "probes" / f"pretrain-r{rnd:04d}.png")
        log.info("[pretrain round %d] probe masked-patch loss %.4f (public images)", rnd, loss)
        return {"probe-loss": loss}


def _tensors(arrays: Arrays) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
