"""Aggregation properties: order invariance, weights, head routing, integer buffers, validation, FedAdam,
and the merging of many sites' metrics into one record."""

from __future__ import annotations

import math

import numpy as np
import pytest
from torch import nn

from shared.federation.aggregation import (
    Chain,
    RunningAverage,
    Sketches,
    Update,
    average,
    bn_keys,
    buffer_keys,
    check_moments,
    check_update,
    cycle_order,
    merge_metrics,
    sketched_cosine,
    update_norm,
)
from shared.federation.exactsum import ExactSum
from shared.federation.strategies import fedadam, fedavgm
from shared.training.moments import ENTRIES


def arrays(seed: int, keys: tuple[str, ...] = ("enc.w", "enc.b", "heads.dr.w")) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {k: rng.normal(size=(3, 4)).astype(np.float32) for k in keys}
    out["bn.running_var"] = np.abs(rng.normal(size=3)).astype(np.float32)
    out["bn.num_batches_tracked"] = np.array(seed, dtype=np.int64)
    return out


REF = arrays(0)


def test_average_equals_a_numpy_weighted_mean_and_ignores_reply_order() -> None:
    ups = [Update("b", arrays(1), 10), Update("a", arrays(2), 30), Update("c", arrays(3), 60)]
    out = average(ups, REF)
    expected = (
        10 * arrays(1)["enc.w"].astype(np.float64) + 30 * arrays(2)["enc.w"] + 60 * arrays(3)["enc.w"]
    ) / 100
    assert np.allclose(out["enc.w"], expected, atol=1e-7)
    assert out["enc.w"].dtype == np.float32
    for perm in ([2, 0, 1], [1, 2, 0]):
        again = average([ups[i] for i in perm], REF)
        assert all(np.array_equal(again[k], out[k]) for k in out)  # bitwise, not just close


def test_one_site_returns_its_weights_bitwise() -> None:
    only = arrays(5)
    out = average([Update("solo", only, 123)], REF)
    assert all(np.array_equal(out[k], only[k]) for k in only)


def test_head_is_averaged_only_among_sites_that_sent_it() -> None:
    with_head = Update("eyepacs", arrays(1), 1)
    without = Update("mmac", {k: v for k, v in arrays(2).items() if not k.startswith("heads.dr")}, 3)
    out = average([with_head, without], REF)
    assert np.array_equal(out["heads.dr.w"], arrays(1)["heads.dr.w"])
    assert np.allclose(out["enc.w"], (arrays(1)["enc.w"] + 3 * arrays(2)["enc.w"].astype(np.float64)) / 4)


def test_integer_buffers_are_never_averaged_as_floats() -> None:
    out = average([Update("a", arrays(3), 1), Update("b", arrays(8), 1)], REF)
    assert out["bn.num_batches_tracked"].dtype == np.int64
    assert int(out["bn.num_batches_tracked"]) == 8


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda a: a.update({"extra": np.zeros(1, np.float32)}), "unexpected keys"),
        (lambda a: a.pop("enc.b"), "missing keys"),
        (lambda a: a.update({"enc.w": np.zeros((4, 3), np.float32)}), "shape"),
        (lambda a: a.update({"enc.w": np.zeros((2, 4), np.float32)}), "shape"),  # would not even broadcast
        (lambda a: a.update({"enc.w": a["enc.w"].astype(np.float64)}), "dtype"),
        (lambda a: a["enc.w"].__setitem__((0, 0), np.nan), "NaN"),
        (lambda a: a.update({"enc.w": a["enc.w"] + 1e6}), "exceeds the bound"),
        (lambda a: a.update({"bn.running_var": -np.ones(3, np.float32)}), "negative variance"),
    ],
)
def test_bad_updates_are_rejected_with_a_reason_and_never_raise(mutate, reason: str) -> None:
    update = {k: v.copy() for k, v in REF.items()}
    mutate(update)
    verdict = check_update(update, REF, required=("enc.w", "enc.b"), max_norm=1e3, examples=10)
    assert verdict.reason is not None and reason in verdict.reason


def moments(seed: int, keys: tuple[str, ...] = ("enc.w", "heads.dr.w")) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {f"{k}/step": np.array(5.0, np.float32) for k in keys}
    out |= {f"{k}/exp_avg": rng.normal(size=(3, 4)).astype(np.float32) for k in keys}
    return out | {f"{k}/exp_avg_sq": np.abs(rng.normal(size=(3, 4))).astype(np.float32) for k in keys}


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda m: m.update({"enc.x/exp_avg": np.zeros((3, 4), np.float32)}), "'enc.x' is no parameter"),
        (lambda m: m.update({"bn.running_var/exp_avg": np.zeros(3, np.float32)}), "is no parameter"),
        (
            lambda m: m.update({"enc.w/exp_avg": np.zeros((4, 3), np.float32)}),
            "shape (4, 3) instead of (3, 4)",
        ),
        (lambda m: m.update({"enc.w/step": np.ones(1, np.float32)}), "shape (1,) instead of ()"),
        (lambda m: m["enc.w/exp_avg"].__setitem__((0, 0), np.inf), "holds NaN or Inf"),
        (lambda m: m.update({"enc.w/exp_avg": np.zeros((3, 4), np.int32)}), "dtype int32"),
        (lambda m: m.update({"enc.w/exp_avg": np.zeros((3, 4), np.float16)}), "not the parameter's float32"),
        (lambda m: m.update({"enc.w/exp_avg_sq": -np.ones((3, 4), np.float32)}), "negative"),
        # the next site's first step would fail on a missing entry, so a partial state is refused
        (lambda m: m.pop("enc.w/step"), "enc.w: entries ['exp_avg', 'exp_avg_sq'] instead of"),
        (lambda m: m.update({"enc.w/momentum_buffer": np.zeros((3, 4), np.float32)}), "entries"),
    ],
)
def test_bad_optimiser_moments_are_refused_with_a_reason(mutate, reason: str) -> None:
    assert check_moments(moments(1), REF, ENTRIES["adamw"]) is None
    sent = {k: v.copy() for k, v in moments(1).items()}
    mutate(sent)
    found = check_moments(sent, REF, ENTRIES["adamw"])
    assert found is not None and reason in found, found
    assert "entries" in (check_moments(moments(1), REF, ENTRIES["sgd"]) or "")  # another optimiser's


@pytest.mark.parametrize("examples", [None, 0, -3, float("nan"), "12"])
def test_a_missing_or_meaningless_example_count_is_rejected(examples: object) -> None:
    verdict = check_update(dict(REF), REF, required=REF, max_norm=1e3, examples=examples)
    assert verdict.reason is not None and "num-examples" in verdict.reason


def test_batchnorm_statistics_are_left_out_of_the_update_norm() -> None:
    """Behind a scale-invariant layer a variance may grow 1e6-fold in a healthy round: not an attack."""
    ref = {**REF, "bn.running_mean": np.zeros(3, np.float32)}
    grown = {"bn.running_var": np.full(3, 1e6, np.float32), "bn.running_mean": np.full(3, 1e3, np.float32)}
    update = {**ref, **grown}
    verdict = check_update(update, ref, required=ref, max_norm=1.0, examples=5)
    assert verdict.reason is None and verdict.norm == 0.0


def test_a_good_update_passes_and_its_norm_is_right() -> None:
    update = {k: v.copy() for k, v in REF.items()}
    update["enc.w"] = update["enc.w"] + 1.0
    verdict = check_update(update, REF, required=REF, max_norm=100, examples=5)
    assert verdict.reason is None and verdict.norm == pytest.approx(np.sqrt(12))
    assert update_norm(update, REF) == pytest.approx(np.sqrt(12))


def test_sketched_cosines_estimate_the_exact_cosine_within_their_standard_error() -> None:
    """Count sketches of 4,096 buckets: the estimate's error is about 1/64; 40 sites, none off by 4/64."""
    rng = np.random.default_rng(7)
    ref = {
        "encoder.w": rng.normal(size=(300, 200)).astype(np.float32),
        "heads.dr.1.w": np.zeros((5, 64), np.float32),
    }
    aggregate = {k: v + rng.normal(scale=0.01, size=v.shape).astype(np.float32) for k, v in ref.items()}
    sketches = Sketches(ref)
    change = sketches.sketch(aggregate)
    errors = []
    for _ in range(40):
        site = {
            k: v + rng.uniform(-1, 1) * (aggregate[k] - v) + rng.normal(scale=0.01, size=v.shape)
            for k, v in ref.items()
        }
        site = {k: v.astype(np.float32) for k, v in site.items()}
        a = np.concatenate([(site[k].astype(np.float64) - ref[k]).ravel() for k in ref])
        b = np.concatenate([(aggregate[k].astype(np.float64) - ref[k]).ravel() for k in ref])
        errors.append(sketched_cosine(sketches.sketch(site), change) - a @ b / np.sqrt((a @ a) * (b @ b)))
    assert np.max(np.abs(errors)) < 4 / 64 and abs(np.mean(errors)) < 2 / 64
    # a site is compared on the groups it sent only: a head-only change meets only the aggregate's head
    head_only = {"heads.dr.1.w": aggregate["heads.dr.1.w"]}
    assert sketched_cosine(sketches.sketch(head_only), change) == pytest.approx(1.0, abs=4 / 64)


def test_exact_sums_do_not_depend_on_the_order_and_read_one_term_back_exactly() -> None:
    """Values spanning 18 orders of magnitude, float32 and float64, weights up to 5,000: every order of
    the terms gives the same bits, within float64's rounding of the true sum (math.fsum)."""
    rng = np.random.default_rng(0)
    xs = [
        (rng.normal(size=300) * 10.0 ** rng.integers(-12, 6, size=300)).astype(np.float32) for _ in range(5)
    ]
    xs.append(rng.normal(size=300) * 1e-3)  # float64 terms are split in two halves
    ws = [int(w) for w in rng.integers(1, 5000, size=len(xs))]
    totals = []
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 4, 2], [2, 5, 4, 1, 3, 0]):
        acc = ExactSum((300,))
        for i in order:
            acc.add(xs[i], ws[i])
        totals.append(acc.total())
    assert all(np.array_equal(t, totals[0]) for t in totals)
    exact = np.array([math.fsum(float(x[j]) * w for x, w in zip(xs, ws, strict=True)) for j in range(300)])
    np.testing.assert_allclose(totals[0], exact, rtol=2e-15, atol=0)  # the bins are read in float64
    one = ExactSum((300,))
    one.add(xs[0], 37)
    assert np.array_equal((one.total() / 37).astype(np.float32), xs[0])
    with pytest.raises(ValueError, match="whole number"):
        one.add(xs[0], 2.5)


def test_a_running_average_folds_replies_one_by_one_into_the_lists_average() -> None:
    ups = [Update("b", arrays(1), 10), Update("a", arrays(2), 30), Update("c", arrays(3), 60)]
    running = RunningAverage(REF)
    for update in reversed(ups):
        running.add(update)
    folded, listed = running.result(), average(ups, REF)
    assert all(np.array_equal(folded[k], listed[k]) for k in REF)


def test_a_head_is_weighted_by_its_own_tasks_examples() -> None:
    big_dr = Update("a", arrays(1), 1000, {"heads.dr.": 10})  # 1000 images, only 10 of them for this head
    small = Update("b", arrays(2), 100, {"heads.dr.": 90})
    out = average([big_dr, small], REF)
    head = (10 * arrays(1)["heads.dr.w"].astype(np.float64) + 90 * arrays(2)["heads.dr.w"]) / 100
    enc = (1000 * arrays(1)["enc.w"].astype(np.float64) + 100 * arrays(2)["enc.w"]) / 1100
    assert np.allclose(out["heads.dr.w"], head, atol=1e-7) and np.allclose(out["enc.w"], enc, atol=1e-7)
    none = average([Update("a", arrays(1), 5, {"heads.dr.": 0})], REF)  # nobody trained the head
    assert np.array_equal(none["heads.dr.w"], REF["heads.dr.w"])


def test_bn_keys_name_parameters_buffers_and_counters() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4))
    assert bn_keys(model) == {
        f"1.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }


def test_fedadam_moves_parameters_along_the_pseudo_gradient_and_leaves_buffers_averaged() -> None:
    ref = {**REF, "bn.running_var": np.full(3, 0.001, np.float32)}
    averaged = {k: (v + 0.1 if v.dtype == np.float32 else v) for k, v in ref.items()}
    out, state = fedadam(ref, averaged, None, lr=0.01, buffers=buffer_keys(ref))
    assert np.array_equal(out["bn.running_var"], averaged["bn.running_var"])  # a variance is not stepped
    step = out["enc.w"].astype(np.float64) - REF["enc.w"]
    # first step: m = 0.1 * delta, v = 0.01 * delta^2 -> lr * 0.1 * 0.1 / (0.1 * 0.1 + tau) along +delta
    assert np.allclose(step, 0.01 * 0.01 / (0.01 + 1e-3), atol=1e-6)
    assert state.step == 1 and int(out["bn.num_batches_tracked"]) == 0


def test_fedavgm_without_momentum_at_lr_1_is_fedavg_bitwise_and_carries_its_momentum() -> None:
    ref = {**REF, "bn.running_var": np.full(3, 0.001, np.float32)}
    first = {k: (v + 0.1 if v.dtype == np.float32 else v) for k, v in ref.items()}
    plain, _ = fedavgm(ref, first, None, lr=1.0, momentum=0.0, buffers=buffer_keys(ref))
    assert all(np.array_equal(plain[k], first[k]) for k in ref)
    out, state = fedavgm(ref, first, None, lr=2.0, momentum=0.5, buffers=buffer_keys(ref))
    assert np.array_equal(out["bn.running_var"], first["bn.running_var"])  # buffers take the average
    assert np.allclose(out["enc.w"], REF["enc.w"] + 2.0 * 0.1, atol=1e-6)
    second = {k: (v + 0.2 if v.dtype == np.float32 else v) for k, v in out.items()}
    again, state = fedavgm(out, second, state, lr=2.0, momentum=0.5, buffers=buffer_keys(ref))
    # m = 0.5 * 0.1 + 0.2 = 0.25, so the second step moves 2 * 0.25
    assert np.allclose(again["enc.w"] - out["enc.w"], 0.5, atol=1e-6) and state.step == 2


def test_merged_metrics_sum_counts_summarise_times_and_weight_the_rest() -> None:
    rows = [
        {"num-examples": 10, "train-loss": 1.0, "steps": 2, "duration-s": 30.0, "dr-num-examples": 10},
        {"num-examples": 30, "train-loss": 2.0, "steps": 4, "duration-s": 10.0, "dr-num-examples": 0},
        {
            "num-examples": 20,
            "train-loss": float("nan"),
            "steps": 3,
            "duration-s": 20.0,
            "dr-num-examples": 5,
        },
    ]
    counts = {"num-examples", "steps", "dr-num-examples"}
    merged = merge_metrics(rows, "num-examples", summed=counts, timed={"duration-s"})
    assert merged == {
        "num-examples": 60,
        "train-loss": (10 * 1.0 + 30 * 2.0) / 40,  # NaN left out, weights renormalised
        "steps": 9,
        "dr-num-examples": 15,
        "duration-s-median": 20.0,
        "duration-s-max": 30.0,
    }
    assert merge_metrics(reversed(rows), "num-examples", summed=counts, timed={"duration-s"}) == merged


def test_per_task_evaluation_is_weighted_by_that_tasks_images_only() -> None:
    rows = [
        {"dr-auc": 0.9, "dr-num-examples": 30},
        {"dr-auc": 0.5, "dr-num-examples": 0},
        {"dr-auc": 0.6, "dr-num-examples": 10},
    ]
    merged = merge_metrics(rows, "dr-num-examples", summed={"dr-num-examples"})
    assert merged == pytest.approx({"dr-auc": (30 * 0.9 + 10 * 0.6) / 40, "dr-num-examples": 40})


def test_rows_without_a_usable_weight_count_only_towards_sums() -> None:
    rows = [{"n": 0, "loss": 5.0, "steps": 1}, {"loss": 7.0, "steps": 2}, {"n": 2, "loss": 1.0, "steps": 3}]
    assert merge_metrics(rows, "n", summed={"n", "steps"}) == {"n": 2.0, "loss": 1.0, "steps": 6.0}
    assert merge_metrics([{"n": 0, "loss": 5.0}], "n", summed={"n"}) == {"n": 0.0}  # nothing to average


def test_the_cycle_order_changes_every_round_and_a_subset_keeps_its_relative_order() -> None:
    sites = [f"site{i}" for i in range(6)]
    orders = [cycle_order(sites, 0, "finetune", rnd) for rnd in range(1, 9)]
    assert all(sorted(o) == sites for o in orders)
    assert len({tuple(o) for o in orders}) == len(orders)  # a new order each round
    assert len({o[-1] for o in orders}) > 1  # no site is always last
    assert cycle_order(sites, 0, "finetune", 3) == orders[2]  # seeded: the same again on a replay
    assert cycle_order(sites, 1, "finetune", 3) != orders[2]
    subset = ["site5", "site1", "site3"]
    assert cycle_order(subset, 0, "finetune", 3) == [s for s in orders[2] if s in subset]


def test_a_chain_hands_on_each_sites_weights_and_ends_with_their_averaged_statistics() -> None:
    first, second = arrays(1), {k: v for k, v in arrays(2).items() if k != "heads.dr.w"}  # no DR labels
    chain = Chain(REF)
    chain.add(Update("a", first, 10))
    assert all(np.array_equal(chain.model[k], first[k]) for k in REF)  # the next site trains from a's model
    chain.add(Update("b", second, 30))
    out = chain.result()
    for key in ("enc.w", "enc.b"):
        assert np.array_equal(out[key], second[key])  # the last site's parameters, not a mean
    assert np.array_equal(out["heads.dr.w"], first["heads.dr.w"])  # b holds no DR head: a's stays
    mean = (10 * first["bn.running_var"].astype(np.float64) + 30 * second["bn.running_var"]) / 40
    np.testing.assert_allclose(out["bn.running_var"], mean, rtol=1e-6)  # statistics averaged as FedAvg does
    assert out["bn.num_batches_tracked"] == 2  # counters: the largest


def test_a_chain_hands_on_the_moments_of_each_parameter_from_its_last_trainer() -> None:
    start = moments(0)
    chain = Chain(REF, start)
    chain.add(Update("a", arrays(1), 10), moments(1))
    assert chain.moments.keys() == start.keys()
    assert all(np.array_equal(chain.moments[k], v) for k, v in moments(1).items())
    # b holds no DR labels, so the chain keeps a's DR head; the moments b sends for it (DP-SGD's noise moves
    # every parameter) are not taken either
    second = Update("b", arrays(2), 30, {"heads.dr.": 0.0})
    chain.add(second, moments(2))
    for key, value in chain.moments.items():
        expected = moments(1) if key.startswith("heads.dr.w/") else moments(2)
        assert np.array_equal(value, expected[key]), key
    assert all(np.array_equal(start[k], v) for k, v in moments(0).items())  # what it started from: untouched
