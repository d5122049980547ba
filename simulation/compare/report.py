"""The comparison's report, computed from the arms' saved predictions and records only.

- results.csv (long: arm, kind, scenario, seed, site, metric, value): every arm's test metrics on the pooled
  test images (site `all`) and on each site's own. Every mean in the report is taken from this file.
- The paired differences (arm - centralised) come from the predictions: the mean over seeds of the
  difference, with a paired bootstrap 95% interval over the test images (each resample re-scores every
  seed's pair on the same images: `shared.metrics.paired_difference_ci`), and a verdict against the margin.
- report.md and report.html say the same (one list of blocks renders both), with PNG learning curves.
"""

from __future__ import annotations

import html
import math
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from shared.config import ExperimentConfig
from shared.data.scenario import load_scenario
from shared.federation.strategies import strategy_of
from shared.federation.wire import FINETUNE, PRETRAIN
from shared.logs import progress_bar
from shared.metrics import paired_difference_ci
from shared.plots import curve_panels
from shared.seeding import derive_seed
from simulation.compare.arms import CENTRALISED, CURVE_KEYS, FEDERATED, CompareArm, load_predictions
from simulation.studies.paired import Metric, Predictions, study_metrics

METRICS = ("referable_auc", "kappa", "auc")
NAMES = {"referable_auc": "referable-DR AUC", "kappa": "DR kappa (quadratic)", "auc": "DR macro AUC"}
RANGES = {"referable_auc": (0.0, 1.0), "kappa": (-1.0, 1.0), "auc": (0.0, 1.0)}  # where each metric can lie
NON_INFERIOR, INCONCLUSIVE, INFERIOR = "non-inferior", "inconclusive", "inferior"


@dataclass(frozen=True)
class Block:
    """One piece of the report: a heading, a paragraph, a table (header + rows) or an image."""

    heading: str = ""
    text: str = ""
    table: tuple[tuple[str, ...], ...] = ()
    image: str = ""


Saved = dict[Path, dict[str, np.ndarray]]  # each arm's folder -> its test.npz, read once


def results_table(cfg: ExperimentConfig, arms: list[CompareArm], predictions: Saved) -> pd.DataFrame:
    """The long results table: each arm's metrics on the pooled test images and on each site's own."""
    metrics = {k: v for k, v in study_metrics(cfg).items() if k in METRICS}
    rows = []
    for arm in arms:
        saved = predictions[arm.folder]
        for site in ["all", *sorted(set(saved["site"]))]:
            mask = np.ones(len(saved["y"]), bool) if site == "all" else saved["site"] == site
            p = Predictions(saved["y"][mask], saved["probs"][mask], saved["logits"][mask])
            for key, metric in metrics.items():
                rows.append(
                    {
                        "arm": arm.label,
                        "kind": arm.kind,
                        "scenario": arm.scenario,
                        "seed": arm.seed,
                        "site": site,
                        "metric": key,
                        "value": metric(p.y, p),
                    }
                )
    return pd.DataFrame(rows)


def mean_ci(
    values: pd.Series, bounds: tuple[float, float] = (-math.inf, math.inf)
) -> tuple[float, float, float]:
    """(mean, 95% low, 95% high) over seeds, Student's t, cut to the metric's `bounds`; one seed has no
    interval (NaN)."""
    x = values.dropna().to_numpy(dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, max(mean - half, bounds[0]), min(mean + half, bounds[1])


def main_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per scenario and arm: mean and 95% CI over seeds of each metric on the pooled test images."""
    pooled = results[results["site"] == "all"]
    rows = []
    for (scenario, arm), g in pooled.groupby(["scenario", "arm"], sort=False):
        row = {"scenario": scenario, "arm": arm, "kind": g["kind"].iloc[0], "seeds": g["seed"].nunique()}
        for key in METRICS:
            values = g.loc[g["metric"] == key, "value"]
            row[key], row[f"{key}_low"], row[f"{key}_high"] = mean_ci(values, RANGES[key])
        rows.append(row)
    return pd.DataFrame(rows)


def differences(cfg: ExperimentConfig, arms: list[CompareArm], predictions: Saved) -> pd.DataFrame:
    """Each federated and local arm minus the centralised arm of its scenario: mean over seeds, paired
    bootstrap 95% CI over the test images, and the verdict on `compare.metric` against `compare.margin`."""
    c = cfg.compare
    metrics = {k: v for k, v in study_metrics(cfg).items() if k in METRICS}
    rows = []
    pairs = [(a.scenario, a.label) for a in arms if a.kind != CENTRALISED]
    bar = progress_bar("paired bootstrap", len(dict.fromkeys(pairs)), "arm")
    for scenario in dict.fromkeys(a.scenario for a in arms):
        mine = [a for a in arms if a.scenario == scenario]
        central = {a.seed: a for a in mine if a.kind == CENTRALISED}
        for label in dict.fromkeys(a.label for a in mine if a.kind != CENTRALISED):
            bar.update()
            paired = sorted((a.seed, a) for a in mine if a.label == label)
            ref = [_paired(predictions[central[seed].folder]) for seed, _ in paired]
            other = [_paired(predictions[a.folder]) for _, a in paired]
            row = {"scenario": scenario, "arm": label, "kind": paired[0][1].kind, "seeds": len(paired)}
            row["test_images"] = len(ref[0].y)
            for key, metric in metrics.items():
                point, low, high = _difference(cfg, ref, other, metric, f"{scenario}/{label}/{key}")
                row |= {key: point, f"{key}_low": low, f"{key}_high": high}
            row["verdict"] = verdict(row[f"{c.metric}_low"], row[f"{c.metric}_high"], c.margin)
            rows.append(row)
    bar.close()
    return pd.DataFrame(rows)


def verdict(low: float, high: float, margin: float) -> str:
    """Non-inferior when the whole interval lies above -margin, inferior when it lies below, else
    inconclusive."""
    if math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    if low > -margin:
        return NON_INFERIOR
    return INFERIOR if high < -margin else INCONCLUSIVE


def _paired(saved: dict[str, np.ndarray]) -> Predictions:
    return Predictions(saved["y"], saved["probs"], saved["logits"])


def _difference(
    cfg: ExperimentConfig, ref: list[Predictions], other: list[Predictions], metric: Metric, key: str
) -> tuple[float, float, float]:
    y = ref[0].y
    if any(not np.array_equal(p.y, y) for p in (*ref, *other)):
        raise ValueError("paired arms were scored on different test images")  # our bug: _score sorts them
    return paired_difference_ci(
        y,
        ref,
        other,
        metric,
        rounds=cfg.finetune.bootstrap,
        seed=derive_seed(cfg.seed, "compare-bootstrap", key),
    )


def write_report(
    cfg: ExperimentConfig,
    arms: list[CompareArm],
    records: list[dict],
    label_mix: dict[str, pd.DataFrame],
    out: Path,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """results.csv, differences.csv, the learning-curve PNGs, report.md and report.html; returns (results,
    main table, differences)."""
    predictions = {arm.folder: load_predictions(arm) for arm in arms}
    results = results_table(cfg, arms, predictions)
    results.to_csv(out / "results.csv", index=False)
    table, diffs = main_table(results), differences(cfg, arms, predictions)
    diffs.to_csv(out / "differences.csv", index=False)
    work = {arm.label: _work(arm) for arm in arms}
    blocks = _blocks(cfg, results, table, diffs, records, label_mix, work, out)
    (out / "report.md").write_text(_markdown(blocks))
    (out / "report.html").write_text(_html(blocks))
    return results, table, diffs


# ------------------------------------------------------------------------------------------ blocks
def _blocks(
    cfg: ExperimentConfig,
    results: pd.DataFrame,
    table: pd.DataFrame,
    diffs: pd.DataFrame,
    records: list[dict],
    label_mix: dict[str, pd.DataFrame],
    work: dict[str, str],
    out: Path,
) -> list[Block]:
    c, f = cfg.compare, cfg.federation
    phases = "SparK pretraining then fine-tuning" if c.pretrain else "fine-tuning only"
    start = f"from {c.encoder}" if c.encoder else "from random weights" if not c.pretrain else ""
    local_bn = any(
        strategy_of(o.get("federation.strategy", f.strategy)).local_batchnorm for o in c.strategies.values()
    )
    fedbn = " A FedBN arm scores each site's test images with that site's own BatchNorm." if local_bn else ""
    names = ", ".join(Path(p).stem for p in c.test_sites)
    held_out = f" and the held-out test site(s) {names}" if c.test_sites else ""
    blocks = [
        Block(heading="# Centralised vs federated"),
        Block(
            text=f"{phases} {start}; {f.rounds_pretrain if c.pretrain else 0} pretraining and "
            f"{f.rounds_finetune} fine-tuning rounds of {f.local_epochs} local epoch(s); the centralised arm "
            "trains as many epochs over the pooled images, each local arm as many over its own (equal "
            f"sample-gradient steps). Seeds {list(c.seeds)}; profile {cfg.profile}. Test metrics on every "
            f"scenario site's own test images{held_out}, pooled; margin: {NAMES[c.metric]} within "
            f"{c.margin}." + fedbn
        ),
    ]
    by_label = pd.DataFrame(records)
    for scenario in dict.fromkeys(table["scenario"]):
        rows, d = table[table["scenario"] == scenario], diffs[diffs["scenario"] == scenario]
        blocks += [
            Block(heading=f"## {load_scenario(scenario).name}"),
            Block(
                text="Mean over seeds, with the 95% interval over seeds (Student's t) when there are several."
            ),
            Block(table=_main_rows(rows)),
            Block(
                text="Arm minus centralised: mean over seeds, paired bootstrap 95% interval over the test "
                f"images; verdict on {NAMES[c.metric]} against -{c.margin}."
            ),
            Block(table=_difference_rows(d, c.metric)),
            Block(text=_resolution(d, c.metric)),
            Block(heading="### Each site's own test images"),
            Block(table=_site_rows(results[results["scenario"] == scenario], c.metric)),
        ]
        png = f"curves_{_slug(scenario)}.png"
        _curves(out / png, by_label[by_label["scenario"] == scenario], load_scenario(scenario).name)
        blocks += [
            Block(heading="### Learning curves"),
            Block(
                text="Validation metrics (federated: each round's image-weighted mean over the sites) "
                "against "
                "the passes over the pooled training images the arm has paid for."
            ),
            Block(image=png),
            Block(heading="### Label mix (training images per DR grade, first seed)"),
            Block(table=_frame_rows(label_mix[scenario])),
            Block(heading="### Cost"),
            Block(table=_cost_rows(by_label[by_label["scenario"] == scenario], work)),
        ]
    blocks += [Block(heading="## Software and seeds"), Block(table=_versions(cfg))]
    return blocks


def _main_rows(rows: pd.DataFrame) -> tuple[tuple[str, ...], ...]:
    header = ("arm", "seeds", *(NAMES[k] for k in METRICS))
    body = [
        (r["arm"], str(r["seeds"]), *(_ci(r[k], r[f"{k}_low"], r[f"{k}_high"]) for k in METRICS))
        for r in rows.to_dict("records")
    ]
    return (header, *body)


def _difference_rows(d: pd.DataFrame, metric: str) -> tuple[tuple[str, ...], ...]:
    header = ("arm − centralised", *(f"Δ {NAMES[k]}" for k in METRICS), f"verdict ({NAMES[metric]})")
    body = [
        (r["arm"], *(_signed(r[k], r[f"{k}_low"], r[f"{k}_high"]) for k in METRICS), r["verdict"])
        for r in d.to_dict("records")
    ]
    return (header, *body)


def _resolution(d: pd.DataFrame, metric: str) -> str:
    """What the comparison can decide: its test images and the median half-width of its paired intervals
    (a difference smaller than that is not told apart from zero)."""
    if d.empty:
        return ""
    half = float(((d[f"{metric}_high"] - d[f"{metric}_low"]) / 2).median())
    return (
        f"Scored on {int(d['test_images'].iloc[0])} test images (resampled image by image); the paired "
        f"intervals of {NAMES[metric]} are ±{half:.3f} wide (median half-width): what this comparison can "
        "tell apart from zero."
    )


def _site_rows(results: pd.DataFrame, metric: str) -> tuple[tuple[str, ...], ...]:
    """The metric per arm on each site's own test images (mean over seeds), the worst site named."""
    own = results[(results["site"] != "all") & (results["metric"] == metric)]
    wide = own.groupby(["arm", "site"], sort=False)["value"].mean().unstack("site")
    header = ("arm", *(str(s) for s in wide.columns), "worst site")
    body = []
    for arm, r in wide.iterrows():
        worst = r.idxmin() if r.notna().any() else "-"
        body.append((str(arm), *(_num(v) for v in r), f"{worst} ({_num(r.min())})"))
    return (header, *body)


def _work(arm: CompareArm) -> str:
    """What the arm trained: epochs, or rounds of local epochs or steps per phase."""
    cfg, f = arm.cfg, arm.cfg.federation
    if arm.kind != FEDERATED:
        pretrain = f"{cfg.pretrain.epochs} pretraining + " if f.rounds_pretrain else ""
        return f"{pretrain}{cfg.finetune.epochs} fine-tuning epochs"
    phases = [(PRETRAIN, f.rounds_pretrain), (FINETUNE, f.rounds_finetune)]
    return ", ".join(f"{phase} {rounds} x {f.local_work(phase)}" for phase, rounds in phases if rounds)


def _cost_rows(records: pd.DataFrame, work: dict[str, str]) -> tuple[tuple[str, ...], ...]:
    header = (
        "arm",
        "rounds x local work",
        "wall-clock per seed (s)",
        "uploads per round (MB)",
        "uploads in total (MB)",
        "epsilon",
    )
    body = []
    for label, g in records.groupby("label", sort=False):
        uploads = [sum(b["bytes"] for b in r) for r in g["bytes_per_round"]]
        per_round = [b["bytes"] for r in g["bytes_per_round"] for b in r]
        eps = {site: e for r in g["epsilon"] for site, e in r.items()}
        body.append(
            (
                str(label),
                work.get(str(label), "-"),
                f"{g['wall_s'].mean():.0f}",
                f"{np.mean(per_round) / 1e6:.2f}" if per_round else "-",
                f"{np.mean(uploads) / 1e6:.1f}" if per_round else "-",
                ", ".join(f"{s} {e:.2f}" for s, e in sorted(eps.items())) or "-",
            )
        )
    return (header, *body)


def _frame_rows(frame: pd.DataFrame) -> tuple[tuple[str, ...], ...]:
    header = ("site", *(str(c) for c in frame.columns))
    return (header, *((str(i), *(str(v) for v in r)) for i, r in frame.iterrows()))


def _versions(cfg: ExperimentConfig) -> tuple[tuple[str, ...], ...]:
    packages = ("torch", "torchvision", "flwr", "numpy", "scikit-learn", "opacus")
    rows = [("python", platform.python_version())]
    rows += [(p, _version(p)) for p in packages]
    rows += [("fedretina commit", _commit()), ("seeds", ", ".join(map(str, cfg.compare.seeds)))]
    return (("software", "version"), *rows)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parent,
    )
    return done.stdout.strip() or "-"


def _curves(path: Path, records: pd.DataFrame, scenario: str) -> None:
    """Per metric, each arm's validation curve (mean over seeds) on the equal-compute axis."""
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {NAMES[k]: {} for k in CURVE_KEYS}
    for label, g in records.groupby("label", sort=False):
        points = pd.DataFrame([p for r in g["curve"] for p in r])
        if points.empty:
            continue
        mean = points.groupby("epochs").mean(numeric_only=True).reset_index()
        for key in CURVE_KEYS:
            if key in mean:
                panels[NAMES[key]][str(label)] = (mean["epochs"].tolist(), mean[key].tolist())
    curve_panels(path, panels, xlabel="passes over the pooled training images", title=scenario)


# ------------------------------------------------------------------------------------------ rendering
def _markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if b.heading:
            lines += [b.heading, ""]
        if b.text:
            lines += [b.text, ""]
        if b.table:
            header, *body = b.table
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(r) + " |" for r in body]
            lines.append("")
        if b.image:
            lines += [f"![{b.image}]({b.image})", ""]
    return "\n".join(lines)


def _html(blocks: list[Block]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Centralised vs federated</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:.5rem 0 1.5rem}"
        "td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}"
        "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
        "img{max-width:100%}</style></head><body>"
    ]
    for b in blocks:
        if b.heading:
            level = len(b.heading) - len(b.heading.lstrip("#"))
            parts.append(f"<h{level}>{html.escape(b.heading.lstrip('# '))}</h{level}>")
        if b.text:
            parts.append(f"<p>{html.escape(b.text)}</p>")
        if b.table:
            header, *body = b.table
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body]
            parts.append("</table>")
        if b.image:
            parts.append(f"<img src='{html.escape(b.image)}' alt='{html.escape(b.image)}'>")
    return "".join(parts) + "</body></html>\n"


def _ci(mean: float, low: float, high: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f}" if math.isnan(low) else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _signed(point: float, low: float, high: float) -> str:
    if math.isnan(point):
        return "-"
    return f"{point:+.3f}" if math.isnan(low) else f"{point:+.3f} [{low:+.3f}, {high:+.3f}]"


def _num(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in Path(name).stem)
