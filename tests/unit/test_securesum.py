"""What sites put through secure aggregation and how the server reads the sum back
(shared/federation/securesum.py): the sum of the vectors decodes to exactly the plain weighted average, task
heads among their holders only; FedBN's layers stay out; integer buffers advance by the round's steps; an
entry beyond the clipping range is refused with the setting to change."""

from __future__ import annotations

import numpy as np
import pytest

from shared.federation.aggregation import Update, average, site_update
from shared.federation.securesum import OutOfRange, SecureLayout, batchnorm_entries

RNG = np.random.default_rng(0)
REFERENCE = {
    "encoder.conv.weight": RNG.normal(size=(4, 3)).astype(np.float32),
    "encoder.bn.weight": np.ones(4, np.float32),
    "encoder.bn.bias": np.zeros(4, np.float32),
    "encoder.bn.running_mean": np.zeros(4, np.float32),
    "encoder.bn.running_var": np.ones(4, np.float32),
    "encoder.bn.num_batches_tracked": np.array(10, np.int64),
    "heads.dr.1.weight": RNG.normal(size=(5, 4)).astype(np.float32),
    "heads.mmac.1.weight": RNG.normal(size=(5, 4)).astype(np.float32),
}
HEADS = ["heads.dr.", "heads.mmac."]


def trained(site: str, tasks: dict[str, int], steps: int) -> Update:
    """A site's reply: every entry moved a little; heads only for the tasks it holds."""
    arrays = {
        k: v + np.asarray(RNG.normal(scale=0.05, size=v.shape), v.dtype) if v.dtype != np.int64 else v + steps
        for k, v in REFERENCE.items()
        if not k.startswith("heads.") or any(k.startswith(f"heads.{t}.") for t in tasks)
    }
    metrics = {"num-examples": sum(tasks.values()), **{f"{t}-num-examples": n for t, n in tasks.items()}}
    return site_update(site, arrays, metrics, {"dr": 5, "mmac": 5})


UPDATES = [
    trained("a", {"dr": 30}, 4),
    trained("b", {"dr": 12, "mmac": 40}, 7),
    trained("c", {"mmac": 9}, 2),
]


def secure_sum(layout: SecureLayout, updates: list[Update]) -> np.ndarray:
    """What SecAgg+ gives the server, without its quantisation: the mean of the sites' vectors."""
    return np.mean([layout.encode(u, REFERENCE) for u in updates], axis=0)


def test_the_sum_decodes_to_the_plain_weighted_average_heads_among_their_holders() -> None:
    layout = SecureLayout.of(REFERENCE, HEADS, set(), scale=52, clip=8.0)
    new = layout.decode(secure_sum(layout, UPDATES), len(UPDATES), REFERENCE, steps=7)
    plain = average(UPDATES, REFERENCE)
    for key, value in plain.items():
        assert value.dtype == new[key].dtype
        np.testing.assert_allclose(new[key], value, rtol=0, atol=1e-6, err_msg=key)
    assert new["encoder.bn.num_batches_tracked"] == plain["encoder.bn.num_batches_tracked"] == 17


def test_a_head_nobody_holds_keeps_the_reference() -> None:
    layout = SecureLayout.of(REFERENCE, HEADS, set(), scale=52, clip=8.0)
    only_dr = UPDATES[:1]
    new = layout.decode(secure_sum(layout, only_dr), 1, REFERENCE, steps=4)
    assert np.array_equal(new["heads.mmac.1.weight"], REFERENCE["heads.mmac.1.weight"])
    assert not np.array_equal(new["heads.dr.1.weight"], REFERENCE["heads.dr.1.weight"])


def test_fedbn_layers_stay_out_of_the_sum() -> None:
    local = batchnorm_entries(REFERENCE)
    assert local == {k for k in REFERENCE if k.startswith("encoder.bn.")}
    layout = SecureLayout.of(REFERENCE, HEADS, local, scale=52, clip=8.0)
    assert not any(k.startswith("encoder.bn.") for k in layout.keys)
    new = layout.decode(secure_sum(layout, UPDATES), len(UPDATES), REFERENCE, steps=7)
    assert np.array_equal(new["encoder.bn.running_var"], REFERENCE["encoder.bn.running_var"])


def test_an_entry_beyond_the_clipping_range_is_refused_naming_the_setting() -> None:
    layout = SecureLayout.of(REFERENCE, HEADS, set(), scale=52, clip=1.0)  # weights are at most 1
    jump = {k: v + 2 if v.dtype != np.int64 else v for k, v in UPDATES[1].arrays.items()}
    pattern = r"reaches 2\.\d+, beyond .* clipping range 1; raise federation\.secagg_clipping_range"
    with pytest.raises(OutOfRange, match=pattern):
        layout.encode(Update("b", jump, 52, UPDATES[1].prefix_weights), REFERENCE)
