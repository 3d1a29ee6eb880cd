"""InteractionIndex: membership of (user, item) pairs as one tensor operation."""

import pytest
import torch

import hdccf_triton.interactions as interactions
from hdccf_triton import InteractionIndex
from hdccf_triton.interactions import csr_keys, csr_segments, pair_keys, sorted_contains, unique_csr


def test_contains_matches_a_python_set():
    g = torch.Generator().manual_seed(0)
    users = torch.randint(0, 50, (400,), generator=g)
    items = torch.randint(0, 80, (400,), generator=g)
    index = InteractionIndex.from_pairs(users, items, 50, 80)
    pairs = set(zip(users.tolist(), items.tolist()))
    assert len(index) == len(pairs)
    qu = torch.randint(0, 50, (30, 40), generator=g)
    qi = torch.randint(0, 80, (30, 40), generator=g)
    got = index.contains(qu, qi)
    want = torch.tensor([[(u, i) in pairs for u, i in zip(ru, ri)] for ru, ri in zip(qu.tolist(), qi.tolist())])
    assert torch.equal(got, want)
    assert index.contains(users, items).all()


def test_broadcasting_and_edges():
    index = InteractionIndex.from_pairs([0, 2, 2], [1, 0, 3], 3, 4)
    got = index.contains(torch.tensor([[0], [1], [2]]), torch.arange(4)[None, :])
    assert got.tolist() == [[False, True, False, False], [False] * 4, [True, False, False, True]]
    empty = InteractionIndex.from_pairs([], [], 3, 4)
    assert not empty.contains(torch.tensor([0]), torch.tensor([1])).any()
    assert empty.to("cpu") is empty
    assert "3 pairs" in repr(index)


def _random_index(num_users, num_items, n, seed):
    g = torch.Generator().manual_seed(seed)
    users, items = torch.randint(0, num_users, (n,), generator=g), torch.randint(0, num_items, (n,), generator=g)
    return InteractionIndex.from_pairs(users, items, num_users, num_items), g


def test_bitmap_and_binary_search_paths_agree(monkeypatch):
    index, g = _random_index(30, 40, 300, seed=1)
    assert index.uses_bitmap  # 1,200 pairs: far below BITMAP_MAX_BITS
    monkeypatch.setattr(interactions, "BITMAP_MAX_BITS", 30 * 40 - 1)
    searched = InteractionIndex(index.keys, 30, 40)
    assert not searched.uses_bitmap
    pairs = set(zip((index.keys // 40).tolist(), (index.keys % 40).tolist()))
    queries = [
        (torch.randint(0, 30, (50, 1), generator=g), torch.randint(0, 40, (1, 60), generator=g)),
        (torch.randint(0, 30, (7, 9), generator=g), torch.randint(0, 40, (7, 9), generator=g)),
        (torch.randint(0, 30, (9, 7), generator=g).T, torch.randint(0, 40, (9, 7), generator=g).T),  # strided
        (torch.tensor(3), torch.arange(40)),
        (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)),
    ]
    for qu, qi in queries:
        got = index.contains(qu, qi)
        assert torch.equal(got, searched.contains(qu, qi))
        want = [(u, i) in pairs for u, i in zip(*(t.reshape(-1).tolist() for t in torch.broadcast_tensors(qu, qi)))]
        assert got.dtype == torch.bool and got.reshape(-1).tolist() == want
    assert searched._bitmap is None  # the search path never builds the dense table


def test_uses_bitmap_up_to_the_limit(monkeypatch):
    index, _ = _random_index(6, 7, 10, seed=2)
    monkeypatch.setattr(interactions, "BITMAP_MAX_BITS", 42)
    assert index.uses_bitmap
    monkeypatch.setattr(interactions, "BITMAP_MAX_BITS", 41)
    assert not index.uses_bitmap


def test_bitmap_bits_are_the_key_set_including_bit_31():
    num_users, num_items = 9, 11  # 99 keys: three full words and a partial one
    users = torch.tensor([0, 2, 5, 8, 8, 3])
    items = torch.tensor([0, 9, 8, 0, 10, 0])  # keys 0, 31, 63, 88, 98, 33: bit 31 of words 0 and 1
    index = InteractionIndex.from_pairs(users, items, num_users, num_items)
    words = index.bitmap()
    assert words.dtype == torch.int32 and words.shape == ((num_users * num_items + 31) // 32,)
    assert words.device == index.device
    every = torch.arange(num_users * num_items)
    bits = (words[every >> 5] >> (every & 31)) & 1
    assert every[bits == 1].tolist() == index.keys.tolist() == [0, 31, 33, 63, 88, 98]
    assert words[0].item() == 1 - 2**31 and words[1].item() == -(2**31) + 2  # bit 31 wraps to int32
    assert index.contains(users, items).all()
    assert index.contains(torch.tensor([0, 2, 5]), torch.tensor([1, 8, 7])).tolist() == [False] * 3


def test_bitmap_is_built_once():
    index, _ = _random_index(20, 30, 100, seed=3)
    words = index.bitmap()
    assert index.bitmap() is words
    index.contains(torch.tensor([1]), torch.tensor([2]))
    assert index.bitmap() is words


def test_pair_helpers():
    keys = torch.tensor([3, 7, 12])
    query = torch.tensor([[0, 3, 5], [7, 12, 13]])
    assert sorted_contains(keys, query).tolist() == [[False, True, False], [True, True, False]]
    assert not sorted_contains(keys[:0], query).any()
    users, items = torch.tensor([2, 0, 2, 1, 2]), torch.tensor([1, 3, 0, 3, 1])  # (2, 1) twice
    assert pair_keys(users, items, 4).tolist() == [9, 3, 8, 7, 9]
    csr = unique_csr(users, items, 3, 4)
    assert csr.indptr.tolist() == [0, 1, 2, 4] and csr.indices.tolist() == [3, 3, 0, 1]
    assert csr_keys(csr.indptr, csr.indices, 4).tolist() == [3, 7, 8, 9]
    local, flat = csr_segments(csr.indptr, torch.tensor([2, 0]))
    assert local.tolist() == [0, 0, 1] and flat.tolist() == [2, 3, 0]


def test_dense_tables_are_d_by_user_and_by_item(monkeypatch):
    users, items = torch.tensor([0, 0, 2, 3, 3]), torch.tensor([1, 4, 0, 4, 2])
    index = InteractionIndex.from_pairs(users, items, num_users=4, num_items=5)
    by_user, by_item = index.table("items"), index.table("users")
    want = torch.zeros(4, 5, dtype=torch.bool)
    want[users, items] = True
    assert torch.equal(by_user, want) and torch.equal(by_item, want.T)
    assert index.table("items") is by_user  # built once
    with pytest.raises(ValueError, match="kind"):
        index.table("pairs")
    monkeypatch.setattr(interactions, "TABLE_MAX_BYTES", 19)  # 4 x 5 = 20 entries: too large
    assert InteractionIndex.from_pairs(users, items, num_users=4, num_items=5).table("items") is None


def test_lists_are_d_by_user_and_by_item():
    users, items = torch.tensor([3, 0, 0, 2, 3]), torch.tensor([4, 4, 1, 0, 2])
    index = InteractionIndex.from_pairs(users, items, num_users=5, num_items=5)
    indptr, listed = index.lists("items")
    assert indptr.tolist() == [0, 2, 2, 3, 5, 5] and listed.tolist() == [1, 4, 0, 2, 4]
    indptr, listed = index.lists("users")
    assert indptr.tolist() == [0, 1, 2, 3, 3, 5] and listed.tolist() == [2, 0, 3, 0, 3]
    assert index.lists("users")[1] is listed  # built once
