"""`fedretina analyze` end to end at the tiny profile, on untrained but seeded models: spectra, robustness
and relevance each run once through the real CLI, and their tables are checked against the library
functions recomputed on the same files and images; bad models fail in one line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from shared.analysis.corruptions import corrupt
from shared.analysis.eigenspectra import pareto_fit, percentile_condition_number
from shared.config import ExperimentConfig, load_config
from shared.data.fundus import crop_to_fov, find_fov, preprocess
from shared.data.images import decode
from shared.data.site import load_site
from shared.data.transforms import FUNDUS_MEAN, FUNDUS_STD
from shared.errors import CheckpointError, UserError
from shared.metrics import evaluate_predictions
from shared.models import ENCODER, TaskModel, build_encoder
from shared.seeding import derive_seed
from shared.training.data import site_images
from shared.training.finetune import reestimate_batchnorm
from shared.training.initialisation import FINETUNE_SEED, finetuning_start
from shared.weights import load_weights, save_weights, weights_meta
from simulation.analysis.robustness import run_robustness
from tests.conftest import FEDRETINA

SIZE = 64  # the tiny profile's image size


@pytest.fixture(scope="module")
def cfg() -> ExperimentConfig:
    return load_config(profile="tiny")


@pytest.fixture(scope="module")
def models(
    cfg: ExperimentConfig, tiny_sites: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Two seeded DR models, saved as `fedretina finetune` saves its models, with BatchNorm statistics
    re-estimated on the EyePACS-like site's images (so their outputs vary by image), and the first one's
    encoder as a SparK-style encoder export."""
    torch.set_num_threads(1)  # as the commands below run (`threads=1`)
    out = tmp_path_factory.mktemp("models")
    site = load_site(tiny_sites["eyepacs"])
    images = site_images(site, cfg, SIZE, "none", rows=site.rows)
    paths = {}
    for name, seed in (("FS", 1), ("CL", 2)):
        model = finetuning_start(cfg.model_copy(update={"seed": seed}), {"dr": 5}, FINETUNE_SEED)
        reestimate_batchnorm(model, images, torch.device("cpu"), cfg.finetune.batch_size)
        paths[name] = out / f"{name}.safetensors"
        save_weights(paths[name], model.state_dict(), weights_meta(cfg, "task-model", tasks={"dr": 5}))
    tensors, _ = load_weights(paths["FS"])
    encoder = {k.removeprefix(ENCODER): v for k, v in tensors.items() if k.startswith(ENCODER)}
    paths["FS-encoder"] = out / "spark.safetensors"
    save_weights(paths["FS-encoder"], encoder, weights_meta(cfg, "spark-encoder", epochs=0))
    return paths


def analyze(command: str, site: Path, models: dict[str, Path], runs: Path, *extra: str) -> Path:
    """Run `fedretina analyze <command>` at the tiny profile; returns its output folder."""
    result = subprocess.run(
        [
            FEDRETINA,
            "-q",
            "analyze",
            command,
            "--profile",
            "tiny",
            "--set",
            f"runs_dir={runs}",
            "--set",
            "threads=1",  # two threads on two busy cores wait on each other: ~100x slower at this size
            "--name",
            "an",
            "--site",
            str(site),
            *(f"--model={name}={path}" for name, path in models.items()),
            *extra,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = runs / "an" / "analysis" / command
    assert f"results: {out}" in result.stdout
    assert (out / "config.yaml").is_file() and (out / "log.txt").is_file()
    return out


def test_spectra_tables_are_the_librarys_summaries_of_the_written_eigenvalues(
    models: dict[str, Path], tiny_sites: dict[str, Path], tmp_path: Path
) -> None:
    out = analyze("spectra", tiny_sites["eyepacs"], models, tmp_path, "--split", "train", "--images", "8")
    spectra = pd.read_csv(out / "spectra.csv")
    condition = pd.read_csv(out / "condition.csv")
    pareto = pd.read_csv(out / "pareto.csv")
    assert list(spectra.columns) == ["model", "layer", "index", "eigenvalue"]
    assert list(condition.columns) == ["layer", "FS", "CL", "FS-encoder"]
    assert list(pareto.columns) == [
        "model",
        "layer",
        "eigenvalues",
        "b",
        "scale",
        "ks_statistic",
        "ks_pvalue",
    ]
    assert len(condition) == 18 and condition.layer.iloc[0] == "features.2"  # stem SiLU, 16 blocks, pen SiLU
    for (model, layer), g in spectra.groupby(["model", "layer"]):
        assert (g["index"].to_numpy() == np.arange(len(g))).all() and (np.diff(g.eigenvalue) <= 0).all()
        expected = percentile_condition_number(g.eigenvalue.to_numpy())
        assert condition.loc[condition.layer == layer, model].item() == pytest.approx(expected, rel=1e-12)
    for row in pareto.itertuples():
        first = spectra[(spectra.model == row.model) & (spectra.layer == row.layer)].eigenvalue.to_numpy()
        fit = pareto_fit(first[first > 0])
        assert (row.layer, row.eigenvalues) == ("features.2", len(first))  # the stem's SiLU: full rank
        assert (row.b, row.ks_statistic) == (pytest.approx(fit.b, rel=1e-12), pytest.approx(fit.ks_statistic))
    # The encoder export holds FS's encoder: loaded as the other kind, it gives the same spectra.
    assert np.array_equal(condition["FS"], condition["FS-encoder"])
    assert not np.array_equal(condition["FS"], condition["CL"])
    for figure in ("condition.png", "density.png"):
        assert (out / figure).stat().st_size > 10_000
    assert "| features.2 |" in (out / "condition.md").read_text()


def test_robustness_changes_equal_a_direct_recomputation(
    cfg: ExperimentConfig, models: dict[str, Path], tiny_sites: dict[str, Path], tmp_path: Path
) -> None:
    dr_models = {k: models[k] for k in ("FS", "CL")}
    out = analyze("robustness", tiny_sites["eyepacs"], dr_models, tmp_path)
    torch.set_num_threads(1)  # the command's thread count: the same float sums
    table = pd.read_csv(out / "robustness.csv")
    assert list(table.columns) == [
        "model",
        "corruption",
        "severity",
        "images",
        "correct_prob_change",
        "auc",
        "auc_change",
        "referable_auc",
        "referable_auc_change",
    ]
    assert len(table) == 2 * 15 * 5 and (table.images == 4).all()  # the test split's 4 graded images
    # One cell, recomputed from the raw files: FOV crop, seeded corruption, normalisation, softmax, metrics.
    rows = load_site(tiny_sites["eyepacs"]).rows
    rows = rows[rows.split == "test"].sort_values("image_id")
    labels = rows.label_dr.to_numpy(dtype=np.int64)
    clean = [preprocess(Path(p), SIZE).rgb for p in rows.path]
    noisy = [
        corrupt(image, "gaussian_noise", 5, derive_seed(cfg.seed, image_id, "gaussian_noise", 5))
        for image, image_id in zip(clean, rows.image_id, strict=True)
    ]
    tensors, meta = load_weights(models["CL"])
    model = TaskModel(build_encoder(cfg.model), meta["tasks"])
    model.load_state_dict(tensors)
    model.eval()
    mean, std = torch.tensor(FUNDUS_MEAN).view(3, 1, 1), torch.tensor(FUNDUS_STD).view(3, 1, 1)

    def probabilities(images: list[np.ndarray]) -> np.ndarray:
        x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255 - mean) / std
        with torch.no_grad():
            return torch.softmax(model(x, "dr").double(), dim=1).numpy()

    before, after = probabilities(clean), probabilities(noisy)
    picked = np.arange(len(labels)), labels
    scores = [
        evaluate_predictions(labels, p, "dr", referable_threshold=cfg.finetune.referable_threshold)
        for p in (before, after)
    ]
    cell = table[(table.model == "CL") & (table.corruption == "gaussian_noise") & (table.severity == 5)]
    assert cell.correct_prob_change.item() == pytest.approx((after[picked] - before[picked]).mean(), abs=1e-6)
    assert cell.auc_change.item() == pytest.approx(scores[1]["auc"] - scores[0]["auc"], abs=1e-9)
    assert cell.referable_auc.item() == pytest.approx(scores[1]["referable_auc"], abs=1e-9)
    assert cell.correct_prob_change.item() != 0
    summary = (out / "robustness.md").read_text()
    assert "| gaussian_noise |" in summary and "| mean |" in summary and "CL Δref AUC" in summary
    for figure in ("delta_FS.png", "delta_CL.png", "difference_CL.png"):
        assert (out / figure).stat().st_size > 10_000
    assert not (out / "difference_FS.png").exists()


def test_relevance_scores_masks_cropped_as_their_images(
    models: dict[str, Path], tiny_sites: dict[str, Path], tmp_path: Path
) -> None:
    dr_models = {k: models[k] for k in ("FS", "CL")}
    out = analyze("relevance", tiny_sites["idrid"], dr_models, tmp_path, "--figures", "3")
    table = pd.read_csv(out / "relevance.csv")
    assert list(table.columns) == [
        "model",
        "image_id",
        "pooling",
        "lesion",
        "rma",
        "rra",
        "control_rma",
        "control_rra",
        "mask_fraction",
    ]
    rows = load_site(tiny_sites["idrid"]).rows
    masked = (rows[[c for c in rows if c.startswith("mask_")]] != "").any(axis=1)
    segmentation = rows[masked].set_index("image_id")
    assert set(table.image_id) == set(segmentation.index)  # every segmentation image, no grading image
    assert len(table) == len(segmentation) * 2 * 2 * 4  # models x poolings x (ma, he, ex, union)
    # An image without a lesion type's mask scores NaN for it; the others are scored.
    for lesion in ("ma", "he", "ex"):
        part = table[table.lesion == lesion]
        absent = segmentation.loc[part.image_id, f"mask_{lesion}"].to_numpy() == ""
        assert np.array_equal(part.mask_fraction.isna().to_numpy(), absent)
    scores = table[["rma", "rra", "control_rma", "control_rra"]].to_numpy().ravel()
    scores = scores[~np.isnan(scores)]
    assert len(scores) and ((scores >= 0) & (scores <= 1)).all()
    # max |R| is never negative: its mass accuracy exists exactly where a mask has pixels at this size.
    max_abs = table[table.pooling == "max_abs"]
    assert np.array_equal(max_abs.rma.notna(), max_abs.mask_fraction > 0)
    # The Gaussian control sits at chance: the masks' area fraction (deterministic draws; measured +5%
    # and +12% over 20 image-lesion pairs, where 25% is 4-5 standard errors of the mass accuracy).
    control = table.dropna(subset=["control_rma"]).drop_duplicates(["image_id", "lesion"])
    assert control.control_rma.mean() == pytest.approx(control.mask_fraction.mean(), rel=0.25)
    assert control.control_rra.mean() == pytest.approx(control.mask_fraction.mean(), rel=0.25)
    # The union mask through the image's own FOV crop: the same pixels as cropping it with crop_to_fov
    # directly, all inside the image's field of view, and the source area scaled by the crop.
    for image_id, row in segmentation.iterrows():
        decoded = decode(Path(row.path), draft=2 * SIZE)
        fov = find_fov(decoded.rgb)
        union = np.logical_or.reduce(
            [np.asarray(Image.open(row[f"mask_{x}"])) > 0 for x in ("ma", "he", "ex") if row[f"mask_{x}"]]
        )
        assert union.shape == decoded.rgb.shape[:2]  # synthetic masks come at the image's size
        cropped = crop_to_fov(np.repeat(union[..., None] * np.uint8(255), 3, axis=2), fov, SIZE)[0][..., 0]
        written = table[(table.image_id == image_id) & (table.lesion == "union")].mask_fraction.iloc[0]
        assert written * SIZE**2 == pytest.approx((cropped >= 128).sum())
        assert preprocess(Path(row.path), SIZE).fov[cropped >= 128].all()
        assert (cropped >= 128).sum() == pytest.approx(union.sum() * (SIZE / (2 * fov.r)) ** 2, rel=0.3)
    summary = (out / "relevance.md").read_text()
    assert "| FS | sum | union |" in summary and "| CL | max_abs | ma |" in summary
    assert (out / "examples.png").stat().st_size > 10_000


def test_a_missing_file_and_an_encoder_export_fail_in_one_line(
    cfg: ExperimentConfig, models: dict[str, Path], tiny_sites: dict[str, Path], tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere.safetensors"
    result = subprocess.run(
        [
            FEDRETINA,
            "analyze",
            "spectra",
            "-p",
            "tiny",
            "--site",
            str(tiny_sites["eyepacs"]),
            f"--model=FS={missing}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == CheckpointError.exit_code, result.stderr
    assert len(lines) == 1 and lines[0].startswith(
        f"fedretina: error: --model FS: {missing}: no such weights"
    )
    # The other refusals, before any data work, as the library raises them (the CLI prints them as above).
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, foreign)
    refusals = {
        f"spark={models['FS-encoder']}": "holds 'spark-encoder' weights; this analysis needs a fine-tuned",
        f"x={foreign}": "records no fedretina metadata",
        f"no-path {models['FS']}": "expected NAME=PATH",
    }
    for spec, message in refusals.items():
        with pytest.raises(UserError) as refused:
            run_robustness(cfg.model_copy(update={"runs_dir": str(tmp_path)}), [spec], tiny_sites["eyepacs"])
        assert message in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
