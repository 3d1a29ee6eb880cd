"""InteractionIndex: membership of (user, item) pairs as one tensor operation."""

import torch

from hdccf_triton import InteractionIndex


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


def test_binary_search_path_matches_dense_table(monkeypatch):
    import hdccf_triton.interactions as interactions

    g = torch.Generator().manual_seed(1)
    users, items = torch.randint(0, 30, (200,), generator=g), torch.randint(0, 40, (200,), generator=g)
    qu, qi = torch.randint(0, 30, (50, 1), generator=g), torch.randint(0, 40, (1, 60), generator=g)
    dense = InteractionIndex.from_pairs(users, items, 30, 40).contains(qu, qi)
    monkeypatch.setattr(interactions, "DENSE_TABLE_LIMIT", 0)
    searched = InteractionIndex.from_pairs(users, items, 30, 40)
    assert torch.equal(searched.contains(qu, qi), dense)
    assert searched._dense is None
