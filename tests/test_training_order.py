"""The sample order: epochs are seeded permutations, drawn once per epoch, the same as before."""
from __future__ import annotations

import torch

from blitext import training
from blitext.training import epoch_order, global_batch


def _drawn_each_time(n, batch_size, seed, step):
    """The order as it was drawn before it was kept: a permutation per call."""
    steps_per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[pos * batch_size:(pos + 1) * batch_size].tolist()


def test_batches_are_the_permutations_they_always_were():
    for n, batch_size, seed in ((50, 8, 0), (50, 8, 3), (7, 16, 1), (1000, 64, 42)):
        assert [global_batch(s, n, batch_size, seed) for s in range(40)] == \
               [_drawn_each_time(n, batch_size, seed, s) for s in range(40)]


def test_each_epoch_is_drawn_once(monkeypatch):
    epoch_order.cache_clear()
    drawn = []
    real = torch.randperm
    monkeypatch.setattr(training.torch, "randperm", lambda n, **kw: drawn.append(n) or real(n, **kw))
    batches = [global_batch(s, 100, 10, 5) for s in range(30)]  # 3 epochs of 10 steps
    assert drawn == [100, 100, 100]
    assert all(sorted(sum(batches[e * 10:(e + 1) * 10], [])) == list(range(100)) for e in range(3))
    assert batches[:10] != batches[10:20]  # each epoch its own order


def test_a_kept_order_cannot_be_changed_by_a_caller():
    order = epoch_order(20, 1, 0)
    assert order.dtype.itemsize == 4 and not order.flags.writeable
