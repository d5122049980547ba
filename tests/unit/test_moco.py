"""MoCo v2's mechanics: momentum update, queue, and key shuffling that changes nothing but BN batches."""

from __future__ import annotations

import torch

from shared.moco import MoCo
from shared.models import nnmobilenet


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


def test_shuffled_key_batches_return_keys_in_the_original_order() -> None:
    moco = tiny_moco().eval()  # eval: BN uses running statistics, so chunking cannot change values
    x = torch.randn(6, 3, 64, 64)
    with torch.no_grad():
        shuffled = moco._keys(x, torch.Generator().manual_seed(3))
        direct = moco.key(x)
    assert torch.allclose(shuffled, direct, atol=1e-6)


def test_loss_is_the_cross_entropy_of_the_positive_among_the_queue() -> None:
    moco = tiny_moco().train()
    x = torch.randn(4, 3, 64, 64)
    loss = moco(x, x.clone(), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert any(p.grad is not None for p in moco.query.parameters())
    assert all(p.grad is None for p in moco.key.parameters())
