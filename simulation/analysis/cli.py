"""`fedretina analyze`: the analysis commands, each parsing its options and calling one `run_*` function of
this package (files in, tables and figures out)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shared.cli_common import ConfigOpt, ProfileOpt, SetOpt, print_report, resolve_config, with_sites

app = typer.Typer(
    help="Analyses of trained models: activation spectra, robustness to corruptions, LRP relevance.",
    no_args_is_help=True,
)


ModelsOpt = Annotated[
    list[str],
    typer.Option(
        "--model",
        help="NAME=PATH of a weights file of ours (repeatable; the first is the reference in comparisons).",
    ),
]
AnalysisSiteOpt = Annotated[Path, typer.Option("--site", help="Site YAML whose images are analysed.")]
ImagesOpt = Annotated[
    int | None, typer.Option("--images", min=1, help="Only the first N images by image id.")
]
AnalysisNameOpt = Annotated[str | None, typer.Option(help="Run name: outputs go under runs/NAME/analysis/.")]


@app.command("spectra")
def analyze_spectra(
    model: ModelsOpt,
    site: AnalysisSiteOpt,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    overrides: SetOpt = None,
    split: Annotated[str, typer.Option(help="The site's split whose images are used.")] = "test",
    images: ImagesOpt = None,
    name: AnalysisNameOpt = None,
) -> None:
    """Activation spectra: per model and conv block, the eigenvalues of the channel covariance over the
    images, the percentile condition number (lambda at the 90th percentile / at the 10th) and a Pareto fit
    of the first layer's eigenvalues. Takes fine-tuned models and encoder exports alike. Eigenvalues at
    round-off level are written as 0, so a rank-deficient layer reads as infinitely ill-conditioned.

    Writes runs/NAME/analysis/spectra/: spectra.csv, condition.csv/.md, pareto.csv/.md, condition.png
    (per layer, one line per model) and density.png (first layer, log-log, with the fitted Pareto pdf).

    Example: fedretina analyze spectra --site sites/generated/eyepacs.yaml --model FS=fs.safetensors
    """
    from simulation.analysis.spectra import run_spectra

    cfg = with_sites(resolve_config(config, profile, overrides), None, name)
    print_report(run_spectra(cfg, model, site, split=split, images=images))


@app.command("robustness")
def analyze_robustness(
    model: ModelsOpt,
    site: AnalysisSiteOpt,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    overrides: SetOpt = None,
    split: Annotated[str, typer.Option(help="The site's split whose graded images are used.")] = "test",
    images: ImagesOpt = None,
    name: AnalysisNameOpt = None,
) -> None:
    """Robustness of fine-tuned DR models to the 15 ImageNet-C corruptions at severities 1-5, each image
    corrupted (seeded by image, corruption and severity) as the model sees it: the change in the correct
    grade's probability, in the macro AUC and in the referable-DR AUC (finetune.referable_threshold).

    Writes runs/NAME/analysis/robustness/: robustness.csv, robustness.md, delta_<model>.png (corruption x
    severity heatmaps) and, with two models or more, difference_<model>.png (that model minus the first).

    Example: fedretina analyze robustness --site sites/generated/eyepacs.yaml --model FS=a.safetensors
    """
    from simulation.analysis.robustness import run_robustness

    cfg = with_sites(resolve_config(config, profile, overrides), None, name)
    print_report(run_robustness(cfg, model, site, split=split, images=images))


@app.command("relevance")
def analyze_relevance(
    model: ModelsOpt,
    site: AnalysisSiteOpt,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    overrides: SetOpt = None,
    split: Annotated[
        str | None, typer.Option(help="Only this split's segmentation images (default: all of them).")
    ] = None,
    images: ImagesOpt = None,
    target_class: Annotated[int, typer.Option(help="The DR grade whose logit is explained.")] = 4,
    figures: Annotated[int, typer.Option(min=0, help="Images shown in examples.png.")] = 4,
    name: AnalysisNameOpt = None,
) -> None:
    """LRP relevance of fine-tuned DR models on an IDRiD-layout site's lesion masks: heatmaps of the
    severe-DR logit (channels pooled by sum and by max |R|), scored by relevance mass and rank accuracy
    on microaneurysms, haemorrhages, hard exudates and their union, beside a Gaussian-random control.

    Writes runs/NAME/analysis/relevance/: relevance.csv, relevance.md and examples.png.

    Example: fedretina analyze relevance --site sites/generated/idrid.yaml --model FS=fs.safetensors
    """
    from simulation.analysis.relevance import run_relevance

    cfg = with_sites(resolve_config(config, profile, overrides), None, name)
    print_report(
        run_relevance(
            cfg, model, site, split=split, images=images, target_class=target_class, figures=figures
        )
    )
