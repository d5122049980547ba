"""Seeds derived from (run seed, round or epoch, site), and the switch for deterministic kernels.

Every random stream in a run (data order, augmentation, SparK masks, dropout) is seeded from
`derive_seed(run_seed, *keys)`, so a federated round and the matching centralised epoch draw the same numbers,
and two runs with one seed are bitwise identical on the same machine.
"""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import torch


def derive_seed(run_seed: int, *keys: object) -> int:
    """A 63-bit seed from the run seed and any keys (round, site name, purpose), stable across processes.

    >>> derive_seed(0, "pretrain", 3, "eyepacs") == derive_seed(0, "pretrain", 3, "eyepacs")
    True
    """
    text = "\x1f".join([str(run_seed), *map(str, keys)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def generator(seed: int) -> torch.Generator:
    """A CPU torch generator seeded with `seed` (masks and shuffles are drawn on the CPU, then moved)."""
    return torch.Generator().manual_seed(seed)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch's global generators (dropout draws from torch's global generator)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Ask torch for deterministic kernels (slower on GPU); on CPU our kernels are already deterministic."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.benchmark = not enabled
