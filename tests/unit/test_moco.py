"""MoCo v2's mechanics: momentum update, queue, BN groups that change nothing but BN batches (and keep a
positive pair's statistics apart), an InfoNCE loss equal to a hand computation from the query, the
momentum-updated key and the old queue, and the queue-length check."""

from __future__ import annotations

import copy

import pytest
import torch

from shared.config import load_config
from shared.errors import ConfigError
from shared.models import nnmobilenet
from shared.models.moco import MoCo, _grouped, bn_groups
from shared.training.moco import check_queue


def tiny_moco(queue: int = 8) -> MoCo:
    torch.manual_seed(0)
    return MoCo(nnmobilenet(0.25), dim=16, queue=queue, momentum=0.9, temperature=0.2)


def test_key_encoder_is_an_exponential_moving_average_of_the_query_encoder() -> None:
    moco = tiny_moco()
    with torch.no_grad():
        for p in moco.query.parameters():
            p.add_(1.0)
    before = [p.clone() for p in moco.key.parameters()]
    moco._momentum_update()
    for k, q, b in zip(moco.key.parameters(), moco.query.parameters(), before, strict=True):
        assert torch.allclose(k, 0.9 * b + 0.1 * q)
    assert all(not p.requires_grad for p in moco.key.parameters())


def test_queue_is_a_ring_buffer_of_the_latest_keys() -> None:
    moco = tiny_moco(queue=8)
    for start in (0, 5):
        keys = torch.nn.functional.normalize(torch.randn(5, 16), dim=1)
        moco._enqueue(keys)
        slots = [(start + i) % 8 for i in range(5)]
        assert torch.equal(moco.queue[slots], keys)
    assert int(moco.queue_ptr) == 2


def test_grouped_batches_return_rows_in_the_original_order() -> None:
    moco = tiny_moco().eval()  # eval: BN uses running statistics, so grouping cannot change values
    x = torch.randn(16, 3, 64, 64)
    query_groups, key_groups = bn_groups(len(x), torch.Generator().manual_seed(3))
    with torch.no_grad():
        for groups in (query_groups, key_groups):
            assert torch.allclose(_grouped(moco.key, x, groups), moco.key(x), atol=1e-6)


@pytest.mark.parametrize(("n", "groups", "shared"), [(64, 8, 1), (16, 2, 4), (8, 1, 8), (4, 1, 4)])
def test_key_groups_meet_each_query_group_in_as_few_images_as_the_sizes_allow(
    n: int, groups: int, shared: int
) -> None:
    query_groups, key_groups = bn_groups(n, torch.Generator().manual_seed(0))
    assert len(query_groups) == len(key_groups) == groups
    assert sorted(torch.cat(key_groups).tolist()) == list(range(n))
    for q in query_groups:
        assert len(q) >= min(n, 8)
        for k in key_groups:
            assert len(set(q.tolist()) & set(k.tolist())) == shared


def test_a_queue_longer_than_half_the_images_is_refused_with_the_bound() -> None:
    cfg = load_config(profile="tiny", overrides={"pretrain.method": "moco", "pretrain.moco_queue": 64})
    check_queue(cfg, 128)
    bound = r"pretrain.moco_queue 64 .* at most 50 \(a power of two such as 32\)"
    with pytest.raises(ConfigError, match=bound):
        check_queue(cfg, 100)


def test_loss_is_the_cross_entropy_of_the_positive_among_the_queue() -> None:
    moco = tiny_moco().train()
    x = torch.randn(4, 3, 64, 64)
    loss = moco(x, x.clone(), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert any(p.grad is not None for p in moco.query.parameters())
    assert all(p.grad is None for p in moco.key.parameters())


def test_loss_matches_a_hand_computed_infonce_and_the_keys_are_enqueued() -> None:
    moco = tiny_moco(queue=8).eval()  # eval: BN uses running statistics, so key shuffling changes nothing
    with torch.no_grad():
        for p in moco.query.parameters():  # query != key, so the momentum update really moves the key encoder
            p.add_(0.05 * torch.randn_like(p))
        moco._enqueue(torch.nn.functional.normalize(torch.randn(5, 16), dim=1))  # pointer 5: batch wraps
    x_q, x_k = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    old_queue, old_ptr = moco.queue.clone(), int(moco.queue_ptr)

    reference = copy.deepcopy(moco)  # the momentum update the call should make, written out
    with torch.no_grad():
        for pk, pq in zip(reference.key.parameters(), reference.query.parameters(), strict=True):
            pk.copy_(0.9 * pk + 0.1 * pq)
        q, k = reference.query(x_q), reference.key(x_k)

    loss = moco(x_q, x_k, torch.Generator().manual_seed(1))

    positive = torch.exp((q * k).sum(dim=1) / 0.2)
    negatives = torch.exp(q @ old_queue.T / 0.2).sum(dim=1)
    expected = -torch.log(positive / (positive + negatives)).mean()
    assert torch.allclose(loss.detach(), expected, atol=1e-5), (loss.item(), expected.item())
    slots = [(old_ptr + i) % 8 for i in range(4)]  # 5, 6, 7, 0
    assert torch.allclose(moco.queue[slots], k, atol=1e-6)
    untouched = [i for i in range(8) if i not in slots]
    assert torch.equal(moco.queue[untouched], old_queue[untouched])
    assert int(moco.queue_ptr) == (old_ptr + 4) % 8
