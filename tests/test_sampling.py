"""The in-batch sampler: hdccf_triton/LOSS.md "Batch" rules, epochs, determinism, Proposition 1."""

from __future__ import annotations

import pytest
import torch

from hdccf_triton.interactions import build_csr
from hdccf_triton.sampling import Batch, InBatchSampler


def _pairs(num_users: int, num_items: int, seed: int, *, degree_one: bool = True):
    """Random unique pairs, including users and items with a single interaction."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.unique(torch.randint(0, num_users * num_items, (num_users * num_items // 4,), generator=g))
    users, items = keys // num_items, keys % num_items
    if degree_one:  # one extra user and one extra item that each interact exactly once
        users = torch.cat([users, torch.tensor([num_users, 0])])
        items = torch.cat([items, torch.tensor([0, num_items])])
        num_users, num_items = num_users + 1, num_items + 1
    perm = torch.randperm(users.numel(), generator=g)
    return users[perm], items[perm], num_users, num_items


def _power_law(num_users: int, num_items: int, n: int, seed: int, alpha: float = 1.0):
    """Unique pairs whose user and item activity follow Zipf laws (rank^-alpha)."""
    g = torch.Generator().manual_seed(seed)
    zipf = lambda k: 1.0 / torch.arange(1, k + 1, dtype=torch.float64) ** alpha  # noqa: E731
    users = torch.multinomial(zipf(num_users), n, replacement=True, generator=g)
    items = torch.multinomial(zipf(num_items), n, replacement=True, generator=g)
    keys = torch.unique(users * num_items + items)
    return keys // num_items, keys % num_items


def _neighbours(rows, cols):
    out = {}
    for r, c in zip(rows.tolist(), cols.tolist()):
        out.setdefault(r, set()).add(c)
    return out


def test_build_csr():
    users, items, nu, ni = _pairs(7, 9, seed=0)
    csr = build_csr(users, items, nu, ni)
    assert csr.indptr[0] == 0 and csr.indptr[-1] == users.numel()
    for r, cols in _neighbours(users, items).items():
        assert csr.indices[csr.indptr[r]:csr.indptr[r + 1]].tolist() == sorted(cols)
    assert torch.equal(csr.indices[csr.indptr[users] + csr.position], items)
    assert torch.equal(csr.degree, torch.bincount(users, minlength=nu))


def test_own_block_rules():
    users, items, nu, ni = _pairs(12, 10, seed=1)
    s = InBatchSampler(users, items, nu, ni, batch_size=16, num_pool=6, seed=3)
    items_of, users_of = _neighbours(users, items), _neighbours(items, users)
    seen_single_user = seen_single_item = False
    for epoch in range(3):
        for b in s.epoch_batches(epoch):
            assert isinstance(b, Batch)
            assert b.pool_items.shape == b.pool_users.shape == (b.users.numel(), 6)
            assert all(t.dtype == torch.int64 for t in b)
            for u, i, pi, pu in zip(b.users.tolist(), b.items.tolist(), b.pool_items.tolist(), b.pool_users.tolist()):
                if len(items_of[u]) == 1:
                    seen_single_user = True
                    assert pi == [i] * 6
                else:
                    assert i not in pi and set(pi) <= items_of[u]
                if len(users_of[i]) == 1:
                    seen_single_item = True
                    assert pu == [u] * 6
                else:
                    assert u not in pu and set(pu) <= users_of[i]
    assert seen_single_user and seen_single_item


def test_pool_is_uniform_over_the_other_items():
    # User 0 has 5 items; rows (0, 0) draw among items 1..4, each with probability 1/4.
    users = torch.tensor([0] * 5 + [1, 1])
    items = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    s = InBatchSampler(users, items, 2, 5, batch_size=7, num_pool=50, seed=0)
    counts = torch.zeros(5)
    for epoch in range(200):  # 200 x 50 = 10,000 draws for row (0, 0): Binomial sd ~ 43
        b = next(iter(s.epoch_batches(epoch)))
        row = ((b.users == 0) & (b.items == 0)).nonzero().item()
        counts += torch.bincount(b.pool_items[row], minlength=5)
    assert counts[0] == 0
    assert (counts[1:] - 2500).abs().max() < 5 * 43


def test_epoch_covers_every_pair_once_and_drop_last():
    users, items, nu, ni = _pairs(20, 15, seed=2)
    n = users.numel()
    s = InBatchSampler(users, items, nu, ni, batch_size=16, num_pool=2, seed=0)
    batches = list(s.epoch_batches(0))
    assert len(batches) == len(s) == -(-n // 16)
    assert all(b.users.numel() == 16 for b in batches[:-1]) and batches[-1].users.numel() == n - 16 * (n // 16)
    got = torch.cat([b.users * ni + b.items for b in batches])
    assert torch.equal(torch.sort(got).values, torch.sort(users * ni + items).values)
    d = InBatchSampler(users, items, nu, ni, batch_size=16, num_pool=2, seed=0, drop_last=True)
    dropped = list(d.epoch_batches(0))
    assert len(dropped) == len(d) == n // 16 and all(b.users.numel() == 16 for b in dropped)


def test_deterministic_for_a_seed():
    users, items, nu, ni = _pairs(20, 15, seed=3)
    make = lambda seed: InBatchSampler(users, items, nu, ni, batch_size=32, num_pool=4, seed=seed)  # noqa: E731
    a, b, c = make(7), make(7), make(8)
    for epoch in (0, 5):
        for x, y in zip(a.epoch_batches(epoch), b.epoch_batches(epoch)):
            assert all(torch.equal(p, q) for p, q in zip(x, y))
    first = lambda s, e: next(iter(s.epoch_batches(e)))  # noqa: E731
    assert not torch.equal(first(a, 0).users, first(c, 0).users)
    assert not torch.equal(first(a, 0).users, first(a, 1).users)
    a.set_epoch(5)
    assert all(torch.equal(p, q) for p, q in zip(next(iter(a)), first(b, 5)))
    # The global RNG is neither used nor disturbed.
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    list(a.epoch_batches(2))
    assert torch.equal(torch.rand(1), before)


def test_proposition_1_negatives_follow_popularity():
    """Among a row's negatives (the other rows' pools) item j appears with probability
    deg_j / N per pool slot, exactly (see the sampling module docstring).

    Tolerance: the count of item j over S pool slots is a sum of S draws with
    p_j = deg_j / N, so its relative error is about sqrt((1 - p_j) / (S p_j)). With
    S = 200 batches x 256 rows x 4 = 204,800 slots, items with an expected count of at
    least 400 have a relative sd of at most 5%; we require every one of them within
    5 sd (sampling noise alone exceeds that with probability < 1e-5 per item) and a
    Pearson correlation above 0.99 over all items.
    """
    num_users, num_items = 1500, 400
    users, items = _power_law(num_users, num_items, 40_000, seed=11)
    n = users.numel()
    s = InBatchSampler(users, items, num_users, num_items, batch_size=256, num_pool=4, seed=0, drop_last=True)
    item_neg = torch.zeros(num_items, dtype=torch.float64)
    user_neg = torch.zeros(num_users, dtype=torch.float64)
    slots = 0
    epoch = 0
    while slots < 200 * 256 * 4:
        for b in s.epoch_batches(epoch):
            m = b.users.numel()
            # Row k's negatives are the pools of the m - 1 other rows: each pool entry is a
            # negative of m - 1 rows.
            item_neg += (m - 1) * torch.bincount(b.pool_items.flatten(), minlength=num_items)
            user_neg += (m - 1) * torch.bincount(b.pool_users.flatten(), minlength=num_users)
            slots += b.pool_items.numel()
            if slots >= 200 * 256 * 4:
                break
        epoch += 1
    per_slot = 256 - 1
    for counts, degree in ((item_neg, torch.bincount(items, minlength=num_items)),
                           (user_neg, torch.bincount(users, minlength=num_users))):
        freq = counts / per_slot  # occurrences per pool slot
        expected = slots * degree.double() / n
        corr = torch.corrcoef(torch.stack([freq, expected]))[0, 1]
        assert corr > 0.99
        frequent = expected >= 400
        assert frequent.sum() >= 10
        p = degree.double()[frequent] / n
        sd = torch.sqrt(slots * p * (1 - p))
        assert ((freq[frequent] - expected[frequent]).abs() / sd).max() < 5


def test_interaction_index_holds_the_training_pairs():
    users, items, nu, ni = _pairs(10, 8, seed=4)
    sampler = InBatchSampler(users, items, nu, ni, batch_size=4, num_pool=2)
    index = sampler.interaction_index()
    assert index.contains(users, items).all()
    assert len(index) == users.numel()
    assert sampler.interaction_index() is index  # one object, so its bitmap is built once


def test_errors():
    users, items, nu, ni = _pairs(5, 5, seed=5)
    with pytest.raises(TypeError, match="users"):
        InBatchSampler(users.int(), items, nu, ni, 4, 2)
    with pytest.raises(TypeError, match="items"):
        InBatchSampler(users, items.tolist(), nu, ni, 4, 2)
    with pytest.raises(ValueError, match="items"):
        InBatchSampler(users, items + ni, nu, ni, 4, 2)
    with pytest.raises(ValueError, match="differ"):
        InBatchSampler(users, items[:-1], nu, ni, 4, 2)
    with pytest.raises(ValueError, match="unique"):
        InBatchSampler(torch.cat([users, users[:1]]), torch.cat([items, items[:1]]), nu, ni, 4, 2)
    with pytest.raises(TypeError, match="batch_size"):
        InBatchSampler(users, items, nu, ni, 0, 2)
    with pytest.raises(TypeError, match="num_pool"):
        InBatchSampler(users, items, nu, ni, 4, 1.5)
    with pytest.raises(ValueError, match="no training pairs"):
        InBatchSampler(users[:0], items[:0], nu, ni, 4, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_device():
    users, items, nu, ni = _pairs(30, 20, seed=6)
    s = InBatchSampler(users, items, nu, ni, batch_size=64, num_pool=4, seed=0, device="cuda")
    items_of = _neighbours(users, items)
    for b in s.epoch_batches(0):
        assert b.pool_items.is_cuda
        for u, i, pi in zip(b.users.tolist(), b.items.tolist(), b.pool_items.tolist()):
            assert set(pi) <= items_of[u] and (i not in pi or len(items_of[u]) == 1)
