"""Data parallelism inside one site: one process per device, each training its slice of every batch.

A site with several devices (`devices: 2` in its YAML) starts one process per device. Every replica walks
the same batches in the same order (the epoch's sampler is seeded, not per process) and trains on
`batch[rank::world]`; after each backward the replicas all-reduce their gradients weighted by their slice's
images, which is the whole batch's mean gradient, and step identical optimisers, so their weights stay
bitwise equal. This is DistributedDataParallel's algorithm, written out over `torch.distributed` because
our methods' loss functions call the bare model (DDP's reducer only hears its own wrapper's forward), and
because weighting by images keeps the mean exact when slices differ in size or one slice is skipped.

What cannot equal single-device training (docs/scale.md): BatchNorm normalises each slice on its own, and
random draws (SparK masks, mixup, dropout) are made per replica. A GroupNorm model without those draws
trains the same maths; the floats differ in rounding only, since the sums are taken in another order.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from shared.config import ExperimentConfig
from shared.device import configure_torch
from shared.errors import ConfigError


@dataclass(frozen=True)
class Replica:
    """This process's place among a site's devices."""

    rank: int
    world: int
    threads: int = 1  # CPU threads for this process: the site's share of the machine

    def configure(self, cfg: ExperimentConfig) -> torch.device:
        """`configure_torch` for one replica: its share of the CPU threads, its own GPU."""
        device = configure_torch(cfg)
        torch.set_num_threads(self.threads)
        return torch.device("cuda", self.rank) if device.type == "cuda" else device

    def sync(self, params: Sequence[nn.Parameter], loss: float, images: int) -> tuple[float, int]:
        """Replace each gradient by the image-weighted mean of every replica's (a parameter has one when any
        replica gave it one) and return the whole batch's (mean loss, images)."""
        device, dtype = params[0].device, params[0].dtype
        held = [p.grad is not None for p in params]
        sums = [(p.grad * images if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        head = torch.tensor([loss * images, images, *held], dtype=dtype, device=device)
        flat = torch.cat([head, *sums])
        dist.all_reduce(flat)  # one message per step, like DDP's buckets merged into one
        total_loss, total = float(flat[0]), int(flat[1])
        offset = 2 + len(params)
        for p, anyone in zip(params, flat[2:offset].tolist(), strict=True):
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).div(total).to(p.dtype) if anyone and total else None
            offset += n
        return total_loss / max(total, 1), total

    def average_buffers(self, model: nn.Module) -> None:
        """BatchNorm's running statistics, averaged over the replicas (each saw only its slices)."""
        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer.div_(self.world)


def check_devices(devices: int, cuda: bool) -> None:
    """A site asking for more GPUs than it has gets one line, not a hung process group."""
    if cuda and devices > torch.cuda.device_count():
        raise ConfigError(
            f"devices: {devices} but this machine sees {torch.cuda.device_count()} GPU(s); lower `devices` "
            "in the site YAML"
        )


def run_replicas(fn: Callable[..., Any], world: int, args: tuple, cuda: bool) -> Any:
    """Run `fn(replica, *args)` in `world` fresh processes joined in one process group (NCCL on GPUs, gloo
    on CPUs); return what rank 0's call returned. A replica's error is raised here with its traceback."""
    check_devices(world, cuda)
    ctx = mp.get_context("spawn")
    results, received = ctx.SimpleQueue(), ctx.Event()
    with tempfile.TemporaryDirectory(prefix="fedretina-replicas-") as rendezvous:
        store = Path(rendezvous) / "store"
        threads = max(torch.get_num_threads() // world, 1)
        context = mp.start_processes(
            _replica_main,
            args=(world, str(store), cuda, threads, (results, received), fn, args),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        out, got = None, False
        while not context.join(timeout=0.2):
            if not got and not results.empty():
                out, got = results.get(), True
                received.set()  # rank 0 may exit now: tensors it sent live in its shared memory
    return out


def _replica_main(
    rank: int,
    world: int,
    store: str,
    cuda: bool,
    threads: int,
    channel: tuple[Any, Any],
    fn: Callable[..., Any],
    args: tuple,
) -> None:
    if cuda:
        torch.cuda.set_device(rank)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        out = fn(Replica(rank, world, threads), *args)
        dist.barrier()
        if rank == 0:
            results, received = channel
            results.put(out)
            received.wait()
    finally:
        dist.destroy_process_group()
