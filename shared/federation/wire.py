"""What crosses the wire besides weights, in one place: the specs the server sends (what a run and a round
ask of a site), what a site says about itself, and the keys of the metrics sites reply with.

Specs travel as a plain dict of scalars (a Flower ConfigRecord's content): kebab-case keys made from the
field names by `to_wire` and read back by `from_wire`, nested specs flattened, mappings and the experiment
config as JSON. The server writes them, the site reads them; neither spells a key by hand. A site derives
everything run-level from its spec and its own data: the resolved config travels whole, so a site never
re-reads an experiment YAML (which in deployment it may not have).
"""

from __future__ import annotations

import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import numpy as np

from shared.config import ExperimentConfig, validate
from shared.errors import ConfigError
from shared.names import check_reported_site, check_run_uid, check_task

PRETRAIN, FINETUNE = "pretrain", "finetune"
PHASES = (PRETRAIN, FINETUNE)

# The records of a message's content: weights and metrics (Flower's own names), the server's spec, a
# site's report of itself, the layouts of the packed records (keyed by record), and under cyclic weight
# transfer with `federation.carry_optimizer` the optimiser moments handed along the chain.
ARRAYS, METRICS, SPEC, REPORT, LAYOUT = "arrays", "metrics", "config", "site", "layout"
MOMENTS = "moments"
PACKED = "packed"  # the one entry of a packed record
# Flower sends an array in chunks (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, its default 5 MiB): the largest body
# a site's SuperNode posts. The site daemon pins it, and the server bounds Fleet bodies by it.
CHUNK_BYTES = 5 << 20

# Reply metrics. Every site sends every key (Flower ends a run on mismatched keys): per task, NaN and 0
# examples where the site lacks the task.
NUM_EXAMPLES = "num-examples"  # images trained on (train) or evaluated (per task): the weighting key
TRAIN_LOSS, STEPS, SECONDS, RATE = "train-loss", "steps", "duration-s", "images-per-s"
DEVICES = "devices"  # the devices a site trained on (its YAML's `devices`; 0 when it refused the round)
EPSILON = "privacy-epsilon"  # under DP: all a site ever released, composed (never the ledger)
# Secure aggregation: the server's scale for the sites' weights (sent with the round), and a site's
# refusal as a metric (0: trained; see shared/federation/securesum.py's REFUSALS), since its reply holds no
# reason.
SECAGG_SCALE, SECAGG_REFUSAL = "secagg-scale", "secagg-refusal"
REFUSAL = "refusal"  # a site's reply that refuses a round: {REASON: why} (and no weights)
REASON = "reason"

Scalar = str | int | float | bool
MAX_TASKS, MAX_CLASSES = 16, 100  # what a round may ask of a site: heads and their classes
MAX_SPEC_CHARS = 256_000  # a spec's longest entry (the resolved config, as JSON, is ~10 kB)
MAX_LAYOUT_ENTRIES = 4096  # tensors in one packed record (the paper-size model has ~600)
# dtypes a packed record may hold: model weights and moments in float, BatchNorm's step counter in int64
WIRE_DTYPES = frozenset({"<f2", "<f4", "<f8", "<i8"})


def _checked(where: str, check: typing.Callable[[str], str], value: str) -> None:
    try:
        check(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def task_key(task: str, name: str) -> str:
    """A per-task metric's key, e.g. `dr-auc`, `dr-num-examples`."""
    return f"{task}-{name}"


@dataclass(frozen=True)
class RunSpec:
    """What every message of a run tells a site about the run."""

    config: ExperimentConfig  # resolved on the server; its `name` is the run's name
    run_uid: str  # the run's identity, kept across resumes: a site files its state under it
    scenario: str  # simulation: the scenario whose partition a node plays; "" in deployment

    def __post_init__(self) -> None:
        _checked("run spec: run-uid", check_run_uid, self.run_uid)


@dataclass(frozen=True)
class RoundSpec:
    """What the server asks of a site this round."""

    run: RunSpec
    phase: str  # PRETRAIN or FINETUNE
    round: int  # 1-based within the phase
    tasks: dict[str, int]  # phase 2: the federation's tasks (one head each) and their class counts

    def __post_init__(self) -> None:
        """A site acts on a round spec (its state folder, its heads, its ledger): everything in it is checked
        here, where it is parsed, not where it is used."""
        if self.phase not in PHASES:
            raise ConfigError(f"round spec: phase {self.phase!r} is not one of {PHASES}")
        if not 1 <= self.round <= max(self.rounds, 1):
            raise ConfigError(f"round spec: round {self.round} outside the phase's 1..{self.rounds}")
        if len(self.tasks) > MAX_TASKS:
            raise ConfigError(f"round spec: {len(self.tasks)} tasks; at most {MAX_TASKS}")
        for task, classes in self.tasks.items():
            _checked("round spec: task", check_task, task)
            if not 2 <= classes <= MAX_CLASSES:
                raise ConfigError(f"round spec: task {task} has {classes} classes; expected 2..{MAX_CLASSES}")

    @property
    def config(self) -> ExperimentConfig:
        return self.run.config

    @property
    def rounds(self) -> int:
        f = self.config.federation
        return f.rounds_pretrain if self.phase == PRETRAIN else f.rounds_finetune


@dataclass(frozen=True)
class SiteReport:
    """What a site says about itself when asked (`query`): counts only, never an image or a path."""

    site: str
    partition: int  # simulation: the node's partition id; -1 in deployment
    images: int
    labelled: dict[str, int]  # task -> labelled images
    classes: dict[str, int]  # task -> number of classes

    def __post_init__(self) -> None:
        """The server names files, tables and MLflow keys after a site (the cross-site table's local
        models): the name and tasks a node reports are checked here, where they are parsed."""
        _checked("site report: site", check_reported_site, self.site)
        for task in (*self.labelled, *self.classes):
            _checked("site report: task", check_task, task)


Spec = RunSpec | RoundSpec | SiteReport
S = typing.TypeVar("S", RunSpec, RoundSpec, SiteReport)


def to_wire(spec: Spec) -> dict[str, Scalar]:
    """`spec` as the kebab-case dict of scalars a ConfigRecord holds."""
    out: dict[str, Scalar] = {}
    for f in fields(spec):
        value = getattr(spec, f.name)
        if is_dataclass(value):
            nested = to_wire(value)  # type: ignore[arg-type]
            assert not set(nested) & set(out), f"{type(spec).__name__}: a nested field's key repeats one"
            out |= nested
        elif isinstance(value, ExperimentConfig):
            out[_kebab(f.name)] = value.model_dump_json()
        elif isinstance(value, Mapping):
            out[_kebab(f.name)] = json.dumps(dict(value))
        else:
            out[_kebab(f.name)] = value
    return out


def from_wire(cls: type[S], record: Mapping[str, Any]) -> S:
    """The spec `to_wire` wrote; a missing or malformed entry is a one-line `ConfigError`."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):
        kind = hints[f.name]
        if is_dataclass(kind):
            values[f.name] = from_wire(kind, record)  # type: ignore[type-var]
            continue
        key, where = _kebab(f.name), _WHAT[cls.__name__]
        if key not in record:
            raise ConfigError(
                f"{where}: no {key!r}; the server and the site run different fedretina versions"
            )
        values[f.name] = _decode(kind, record[key], f"{where}: {key}")
    return cls(**values)


_WHAT = {"RunSpec": "run spec", "RoundSpec": "round spec", "SiteReport": "site report"}


def _decode(kind: Any, raw: Any, where: str) -> Any:
    if isinstance(raw, str) and len(raw) > MAX_SPEC_CHARS:
        raise ConfigError(f"{where}: {len(raw)} characters; at most {MAX_SPEC_CHARS}")
    try:
        if kind is ExperimentConfig:
            return validate(ExperimentConfig, json.loads(raw), f"{where}")
        if typing.get_origin(kind) is dict:
            return {str(k): _exact(int, v) for k, v in json.loads(raw).items()}
        return _exact(kind, raw)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{where}: cannot read {raw!r} ({exc})") from None


def _exact(kind: type, raw: Any) -> Any:
    """`raw` as `kind`, refusing lossy conversions (2.7 as an int, "false" as a bool)."""
    if kind is bool and not isinstance(raw, bool):
        raise TypeError(f"expected a bool, got {type(raw).__name__}")
    value = kind(raw)
    if kind is int and value != raw:
        raise ValueError("not a whole number")
    return value


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def pack(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """Weights as one byte buffer and its layout (JSON: key, dtype, shape, offset, size per tensor).

    Flower moves every Array of a record as its own request: a model's hundreds of tensors made hundreds of
    TLS round trips per message in deployment. One buffer (in 5 MB chunks) is a handful."""
    entries, parts, offset = [], [], 0
    for key, value in arrays.items():
        raw = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        entries.append([key, value.dtype.str, list(value.shape), offset, int(raw.size)])
        parts.append(raw)
        offset += raw.size
    buffer = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return buffer, json.dumps(entries)


def pack_records(
    weights: Mapping[str, np.ndarray], moments: Mapping[str, np.ndarray] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A message's weights (and moments) as one buffer each, and their layouts, keyed by record name: the
    sender puts each buffer in an ArrayRecord's PACKED entry and the layouts in the LAYOUT ConfigRecord."""
    buffers, layouts = {}, {}
    for name, arrays in ((ARRAYS, weights), (MOMENTS, moments)):
        if arrays is not None:
            buffers[name], layouts[name] = pack(arrays)
    return buffers, layouts


def unpacked(content: Mapping[str, Any], name: str = ARRAYS) -> dict[str, np.ndarray]:
    """Record `name` of a message's content as `pack_records` packed it (read-only views of its buffer); a
    record of another kind (a site's reply is input) is a ValueError, a missing one a KeyError."""
    try:
        buffer = content[name][PACKED].numpy()
    except (AttributeError, TypeError) as exc:
        raise ValueError(f"record {name!r} holds no packed buffer ({exc})") from None
    return unpack(buffer, str(content[LAYOUT][name]))


def unpack(buffer: np.ndarray, layout: str) -> dict[str, np.ndarray]:
    """`pack`'s inverse. The layout is a peer's input: its entries must tile the buffer exactly, in order
    (no overlap, no gap, so the arrays never take more memory than the bytes that came), each with a
    known dtype, a shape that fits its bytes and a unique key. Anything else is a ValueError naming the
    entry."""
    if len(layout) > MAX_SPEC_CHARS * 4:
        raise ValueError(f"weights layout of {len(layout)} characters")
    try:
        entries = json.loads(layout)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed weights layout: {exc}") from None
    if not isinstance(entries, list) or len(entries) > MAX_LAYOUT_ENTRIES:
        raise ValueError(f"a weights layout is a list of at most {MAX_LAYOUT_ENTRIES} entries")
    raw = np.asarray(buffer).reshape(-1).view(np.uint8)
    out: dict[str, np.ndarray] = {}
    expected = 0
    for entry in entries:
        key, dtype, shape, offset, size = _entry(entry)
        if key in out:
            raise ValueError(f"{key}: twice in the weights layout")
        if offset != expected or offset + size > raw.size:
            raise ValueError(f"{key}: bytes {offset}..{offset + size} do not follow the previous entry")
        if math.prod(shape) * dtype.itemsize != size:
            raise ValueError(f"{key}: shape {shape} of {dtype.str} is not {size} bytes")
        out[key] = np.frombuffer(raw[offset : offset + size].tobytes(), dtype).reshape(shape)
        expected = offset + size
    if expected != raw.size:
        raise ValueError(f"the weights layout covers {expected} of the buffer's {raw.size} bytes")
    return out


def _entry(entry: Any) -> tuple[str, np.dtype, tuple[int, ...], int, int]:
    """One layout entry [key, dtype, shape, offset, size], type-checked."""
    try:
        key, dtype, shape, offset, size = entry
    except (TypeError, ValueError):
        raise ValueError(f"layout entry {str(entry)[:80]!r}: not [key, dtype, shape, offset, size]") from None
    ints = [offset, size, *shape] if isinstance(shape, list) else None
    if not isinstance(key, str) or not key or len(key) > 256 or ints is None or len(shape) > 8:
        raise ValueError(f"layout entry {str(entry)[:80]!r}: malformed")
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in ints):
        raise ValueError(f"{key}: offsets, sizes and shapes are whole numbers >= 0")
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"{key}: dtype {dtype!r} is not one of {sorted(WIRE_DTYPES)}")
    return key, np.dtype(dtype), tuple(shape), offset, size
