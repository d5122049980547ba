"""Metrics equal scikit-learn's (and independent formulas) on random inputs; keys never vary."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

from shared.data.labels import referable_logit_probability, referable_probability
from shared.metrics import (
    auc_score,
    bootstrap_ci,
    evaluate_predictions,
    mean_std,
    metric_keys,
    paired_difference_ci,
    quadratic_kappa,
)

RNG = np.random.default_rng(0)


def random_case(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)  # every class present
    logits = rng.normal(size=(n, k)) + np.eye(k)[y] * rng.uniform(0, 2)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


def mann_whitney_auc(y: np.ndarray, score: np.ndarray) -> float:
    """AUC as the probability that a positive outranks a negative (ties count half)."""
    pos, neg = score[y == 1], score[y == 0]
    return float(
        ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    )


def explicit_quadratic_kappa(y: np.ndarray, p: np.ndarray, k: int) -> float:
    observed = np.zeros((k, k))
    np.add.at(observed, (y, p), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    w = np.array([[(i - j) ** 2 for j in range(k)] for i in range(k)]) / (k - 1) ** 2
    return 1 - (w * observed).sum() / (w * expected).sum()


@pytest.mark.parametrize("seed", range(5))
def test_five_class_metrics_equal_sklearn_and_explicit_formulas(seed: int) -> None:
    y, probs = random_case(200, 5, seed)
    pred = probs.argmax(1)
    m = evaluate_predictions(y, probs, "mmac")
    assert set(m) == set(metric_keys("mmac"))
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["auc"] == pytest.approx(
        np.mean([mann_whitney_auc((y == c).astype(int), probs[:, c]) for c in range(5)])
    )
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["kappa"] == pytest.approx(explicit_quadratic_kappa(y, pred, 5))
    assert m["f1_weighted"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert math.isnan(m["sensitivity"]) and math.isnan(m["specificity"])  # binary views only


@pytest.mark.parametrize(("seed", "threshold"), [(0, 2), (1, 2), (2, 3), (3, 3)])
def test_referable_dr_is_the_sum_of_referable_grade_probabilities(seed: int, threshold: int) -> None:
    y, probs = random_case(300, 5, seed)
    m = evaluate_predictions(y, probs, "dr", referable_threshold=threshold)
    y_ref = (y >= threshold).astype(int)
    p_ref = probs[:, threshold:].sum(1)
    assert np.allclose(referable_probability(probs, threshold), p_ref)
    assert m["referable_auc"] == pytest.approx(roc_auc_score(y_ref, p_ref))
    assert m["referable_auc"] == pytest.approx(mann_whitney_auc(y_ref, p_ref))
    called = p_ref >= 0.5
    assert m["referable_sensitivity"] == pytest.approx(called[y_ref == 1].mean())
    assert m["referable_specificity"] == pytest.approx((~called)[y_ref == 0].mean())


def test_binary_task_sensitivity_specificity_and_auc() -> None:
    y, probs = random_case(150, 2, 7)
    m = evaluate_predictions(y, probs, "ad")
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]))
    assert m["sensitivity"] == pytest.approx((probs[y == 1, 1] >= 0.5).mean())
    assert m["specificity"] == pytest.approx((probs[y == 0, 1] < 0.5).mean())


def test_keys_are_fixed_even_when_a_value_is_undefined() -> None:
    y = np.zeros(10, dtype=int)  # one class only: AUC undefined
    probs = np.tile([0.9, 0.05, 0.05, 0.0, 0.0], (10, 1))
    m = evaluate_predictions(y, probs, "dr")
    assert tuple(m) == metric_keys("dr")
    assert math.isnan(m["auc"]) and m["accuracy"] == 1.0


def test_bootstrap_interval_brackets_the_estimate_and_is_seeded() -> None:
    y, probs = random_case(300, 2, 3)
    point = roc_auc_score(y, probs[:, 1])

    def auc(a: np.ndarray, b: np.ndarray) -> float:
        return roc_auc_score(a, b[:, 1]) if len(np.unique(a)) == 2 else math.nan

    low, high = bootstrap_ci(y, probs, auc, rounds=300, seed=1)
    assert low < point < high and high - low < 0.2
    assert (low, high) == bootstrap_ci(y, probs, auc, rounds=300, seed=1)


def test_mean_std_over_folds_ignores_nan() -> None:
    summary = mean_std([{"auc": 0.8}, {"auc": 0.9}, {"auc": math.nan}])
    assert summary["auc"][0] == pytest.approx(0.85)
    assert summary["auc"][1] == pytest.approx(np.std([0.8, 0.9], ddof=1))


@pytest.mark.parametrize("threshold", [2, 3])
def test_referable_from_logits_is_a_softmax_over_the_two_sums(threshold: int) -> None:
    """The second seed's reading: softmax over (sum of non-referable logits, sum of referable logits); it
    differs from summing probabilities, and a logit shift common to all grades changes it (one grade more on
    one side), which a softmax over the five grades would not."""
    logits = np.random.default_rng(threshold).normal(scale=30.0, size=(64, 5))
    sums = np.stack([logits[:, :threshold].sum(1), logits[:, threshold:].sum(1)], axis=1)
    expected = np.exp(sums[:, 1] - np.logaddexp(sums[:, 0], sums[:, 1]))
    got = referable_logit_probability(logits, threshold)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-300)
    assert np.isfinite(got).all() and ((got >= 0) & (got <= 1)).all()  # no overflow at |sum| ~ 100
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert not np.allclose(got, referable_probability(probs, threshold))
    shifted = referable_logit_probability(logits + 1.0, threshold)
    assert not np.allclose(shifted, got)


def test_a_seeds_grid_interval_holds_the_seeds_spread_that_an_images_only_interval_cannot() -> None:
    """Runs whose difference is a constant per (pretraining seed, fine-tuning seed), whatever the images: an
    interval over images alone is that mean exactly; the grid's redraws the seeds, so it spans their
    spread, inside the smallest and largest constant."""
    y = np.arange(50) % 2
    base = np.random.default_rng(0).random(50)
    shifts = np.array([[0.00, 0.02, 0.04], [0.10, 0.12, 0.14]])  # 2 pretraining x 3 fine-tuning seeds
    runs = [base + c for c in shifts.ravel()]

    def mean(_: np.ndarray, p: np.ndarray) -> float:
        return float(p.mean())

    point, low, high = paired_difference_ci(y, [base] * 6, runs, mean, rounds=300, seed=2)
    assert point == pytest.approx(shifts.mean()) and low == pytest.approx(high) == pytest.approx(point)
    point, low, high = paired_difference_ci(y, [base] * 6, runs, mean, rounds=300, seed=2, seeds_grid=(2, 3))
    assert point == pytest.approx(shifts.mean())
    assert shifts.min() <= low < point - 0.03 and point + 0.03 < high <= shifts.max()
    with pytest.raises(ValueError, match=r"seeds_grid \(4, 3\) does not hold 6 runs"):
        paired_difference_ci(y, [base] * 6, runs, mean, seeds_grid=(4, 3))


def test_auc_and_kappa_equal_scikit_learns_with_ties_and_absent_grades() -> None:
    """The bootstraps' fast AUC (Mann-Whitney, ties a half) and kappa (confusion matrix) equal
    scikit-learn's."""
    rng = np.random.default_rng(7)
    for case in range(40):
        n, k = int(rng.integers(6, 300)), int(rng.choice([2, 5]))
        y = rng.integers(0, k - (case % 3 == 0), n)  # every third case lacks the top grade
        probs = rng.dirichlet(np.ones(k), n).round(1 + case % 2)  # rounding makes ties
        if len(np.unique(y)) < 2:
            continue
        present = np.unique(y)
        expected = (
            roc_auc_score(y, probs[:, 1])
            if k == 2
            else np.mean([roc_auc_score(y == c, probs[:, c]) for c in present])
        )
        assert auc_score(y, probs) == pytest.approx(expected, abs=1e-12)
        pred = probs.argmax(axis=1)
        kappa = cohen_kappa_score(y, pred, labels=list(range(k)), weights="quadratic")
        assert quadratic_kappa(y, pred, k) == pytest.approx(kappa, abs=1e-12)
