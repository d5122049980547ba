"""What a site accepts from a server: the round spec checked against this site before any work starts.

The spec's form (ids, phase, round, tasks) is checked where it is parsed (`shared/federation/wire.py`); the
run's name is checked by the config itself. Here the round is checked against the site: the work it asks
(input sizes, batch, model width, local epochs or steps, processes, threads) within the limits of the site's
own YAML (`limits:`), and task heads that can hold the site's labels. A refused round raises a `ConfigError`
the site logs whole; the server learns only its class.
"""

from __future__ import annotations

from shared.data.manifest import task_classes
from shared.data.site import Site
from shared.errors import ConfigError
from shared.federation.wire import FINETUNE, PRETRAIN, RoundSpec


def check_round(site: Site, spec: RoundSpec) -> None:
    """Refuse a round that asks more of `site` than its `limits:` allow, or heads too small for its labels."""
    cfg, limits = spec.config, site.config.limits
    asked = {
        "image_size": max(cfg.data.image_size, cfg.finetune_image_size),
        "batch_size": max(cfg.pretrain.batch_size, cfg.finetune.batch_size),
        "width_mult": cfg.model.width_mult,
        "decoder_width": cfg.pretrain.decoder_width,
        "local_epochs": cfg.federation.local_epochs,
        "local_steps": max(cfg.federation.steps_in(p) for p in (PRETRAIN, FINETUNE)),
        "workers": cfg.data.workers,
        "threads": cfg.threads,
    }
    for key, value in asked.items():
        if value > getattr(limits, key):
            raise ConfigError(
                f"site {site.config.name}: the server asks {key} {value}, above this site's limit "
                f"{getattr(limits, key)} (limits.{key} in {site.config.source})"
            )
    own = task_classes(site.rows)
    for task, classes in spec.tasks.items():
        if task in own and classes < own[task]:
            raise ConfigError(
                f"site {site.config.name}: the server's {task} head has {classes} classes, this site's "
                f"labels have {own[task]}"
            )
