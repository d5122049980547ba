"""DP-SGD for the centralised commands (`fedretina pretrain` / `finetune`): the same PrivateSGD a site
uses, with the experiment's own budget (`privacy.target_epsilon`, `privacy.delta`) and a ledger in the run
folder, where each trained model (a pretraining run, a fine-tuning fold) has its own entries."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from shared.config import ExperimentConfig
from shared.errors import ConfigError
from shared.privacy.accounting import Mechanism, epsilon, noise_for
from shared.privacy.ledger import Ledger
from shared.privacy.sgd import PrivateSGD

log = logging.getLogger(__name__)
LEDGER = "privacy-ledger.jsonl"  # in the run folder


def private_sgd(
    cfg: ExperimentConfig, ledger: Ledger, model: str, plan: Sequence[tuple[float, int]], batch_size: int
) -> PrivateSGD | None:
    """The model's DP-SGD (None when privacy is off): sigma fixed by the config, or chosen once so that
    `plan` [(q, steps)] lands on the budget, and kept in the ledger so a resumed run keeps it."""
    p = cfg.privacy
    if not p.enabled:
        return None
    planned = ledger.plan(model)
    sigma = p.noise_multiplier if p.noise_multiplier is not None else (planned or {}).get("sigma")
    if sigma is None:
        sigma = noise_for(p.target_epsilon, p.delta, [], plan)
        if sigma is None:
            steps = sum(n for _, n in plan)
            raise ConfigError(
                f"privacy.target_epsilon: {p.target_epsilon:g} cannot cover {steps} steps at any noise; "
                "raise it or train fewer epochs"
            )
    if planned is None:
        ledger.append("plan", run_uid=model, sigma=sigma, planned=[list(m) for m in plan], **fields(cfg))
    return PrivateSGD(sigma, p.clip, p.unit, batch_size, p.grad_sample_mode)


def release(cfg: ExperimentConfig, ledger: Ledger, model: str, mechanisms: Sequence[Mechanism]) -> float:
    """Record a model's steps when it leaves the run (exported or scored); returns its epsilon."""
    spent = epsilon(mechanisms, cfg.privacy.delta)
    ledger.append(
        "release", model=model, mechanisms=[list(m) for m in mechanisms], epsilon=spent, **fields(cfg)
    )
    log.info(
        "%s: epsilon %.3f at delta %g (privacy unit: %s)", model, spent, cfg.privacy.delta, cfg.privacy.unit
    )
    return spent


def fields(cfg: ExperimentConfig) -> dict:
    p = cfg.privacy
    return {"unit": p.unit, "delta": p.delta, "target_epsilon": p.target_epsilon}
