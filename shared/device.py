"""Where to compute, and the GPU-only speed-ups (bf16 autocast, channels_last) behind one switch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from shared.config import ExperimentConfig
from shared.errors import ConfigError
from shared.seeding import set_deterministic


def configure_torch(cfg: ExperimentConfig) -> torch.device:
    """Apply the run's compute settings (threads, deterministic kernels) and return its device.

    Every entry point that trains calls this, so a federated site and the centralised reference compute the
    same floats when they are given the same settings.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_deterministic(cfg.deterministic)
    return pick_device(cfg.device)


def pick_device(preference: str = "auto") -> torch.device:
    """ "auto" takes the GPU when there is one; asking for "cuda" on a machine without one is an error."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no GPU is visible; use device: auto or cpu")
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool) -> Iterator[None]:
    """bf16 autocast on CUDA when enabled; a no-op on CPU (CPU runs stay in float32, bit-reproducible)."""
    if enabled and device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield
