"""HR@K / NDCG@K, the tie rule, and the sampled and full-ranking protocols."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hdccf_triton.metrics import Evaluator, evaluate, format_results, metrics_from_counts, ranking_metrics


def _dcg(rank: int, k: int) -> float:
    return 1.0 / math.log2(rank + 2) if rank < k else 0.0


class TableModel:
    """Scores read from a fixed [num_users, num_items] table (small ints: many ties)."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def score(self, users, items):
        return torch.gather(self.table[users], 1, items)

    def score_all(self, users):
        return self.table[users]


def _tiny(seed: int = 0, num_users: int = 9, num_items: int = 30, multi_test: bool = False):
    """A random tiny split: train pairs, one valid item and one (or several) test items per user."""
    g = torch.Generator().manual_seed(seed)
    train, valid, test = [], [], []
    for u in range(num_users):
        perm = torch.randperm(num_items, generator=g).tolist()
        n_train = 2 + u  # user 8 has 10 train items
        train += [(u, i) for i in perm[:n_train]]
        if u % 4 != 3:  # some users have no held-out item
            valid.append((u, perm[n_train]))
            n_test = 1 + (u % 3 if multi_test else 0)
            test += [(u, i) for i in perm[n_train + 1:n_train + 1 + n_test]]
    as_t = lambda pairs: (torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs]))  # noqa: E731
    return as_t(train), as_t(valid), as_t(test)


def _brute_force(table, train, valid, test, split, protocol, negatives, ks):
    """The definitions, written as plain Python loops."""
    held = valid if split == "valid" else test
    known = {}
    for pairs in (train, valid, test):
        for u, i in zip(*[t.tolist() for t in pairs]):
            known.setdefault(u, set()).add(i)
    masked = {}
    for pairs in ((train, valid) if split == "valid" else (train, valid, test)):
        for u, i in zip(*[t.tolist() for t in pairs]):
            masked.setdefault(u, set()).add(i)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("HR", "NDCG")}
    n = 0
    for u, i in zip(*[t.tolist() for t in held]):
        if protocol == "sampled":
            cands = negatives[u].tolist()
            assert not set(cands) & known[u]
        else:
            cands = [j for j in range(table.shape[1]) if j not in masked[u]]
        pos = table[u, i].item()
        g = sum(1 for j in cands if table[u, j].item() > pos)
        e = sum(1 for j in cands if table[u, j].item() == pos)
        for k in ks:  # expected value over the e+1 equally likely tie positions
            sums[f"HR@{k}"] += sum(1.0 for r in range(g, g + e + 1) if r < k) / (e + 1)
            sums[f"NDCG@{k}"] += sum(_dcg(r, k) for r in range(g, g + e + 1)) / (e + 1)
        n += 1
    return {name: s / n for name, s in sums.items()}


def test_hand_made_case():
    pos = torch.tensor([0.5, 0.5, 2.0])
    cand = torch.tensor([[0.9, 0.1, 0.3], [0.5, 0.5, 0.1], [0.0, float("nan"), 1.0]])
    m = ranking_metrics(pos, cand, ks=(1, 2))
    # row 0: one better -> rank 1; row 1: two ties -> rank uniform on {0,1,2}; row 2: rank 0
    assert m["HR@1"].tolist() == pytest.approx([0.0, 1 / 3, 1.0])
    assert m["HR@2"].tolist() == pytest.approx([1.0, 2 / 3, 1.0])
    assert m["NDCG@1"].tolist() == pytest.approx([0.0, 1 / 3, 1.0])
    assert m["NDCG@2"].tolist() == pytest.approx([1 / math.log2(3), (1 + 1 / math.log2(3)) / 3, 1.0])


def test_expected_tie_rule_matches_enumerating_every_tie_order():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        scores = torch.randint(0, 3, (6,), generator=g).float()  # item 0 is the held-out one
        ks = (1, 2, 3, 5)
        m = ranking_metrics(scores[:1], scores[1:].unsqueeze(0), ks)
        perms = list(itertools.permutations(range(6)))
        for k in ks:
            hr = ndcg = 0.0
            for order in perms:  # random tie-break = sort by (score desc, random permutation)
                ranked = sorted(range(6), key=lambda j: (-scores[j].item(), order[j]))
                r = ranked.index(0)
                hr += r < k
                ndcg += _dcg(r, k)
            assert m[f"HR@{k}"].item() == pytest.approx(hr / len(perms))
            assert m[f"NDCG@{k}"].item() == pytest.approx(ndcg / len(perms))


def test_metrics_from_counts_edges():
    m = metrics_from_counts(torch.tensor([0, 9, 10, 3]), torch.tensor([0, 0, 0, 100]), ks=(10,))
    assert m["HR@10"].tolist() == pytest.approx([1.0, 1.0, 0.0, 7 / 101])
    assert m["NDCG@10"][1].item() == pytest.approx(1 / math.log2(11))


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluator_matches_brute_force(split, overlap):
    train, valid, test = _tiny(seed=3)
    if overlap:  # a test pair that is also a training pair is masked once
        u = int(test[0][0])
        test[1][0] = train[1][train[0] == u][0]
    num_users, num_items = 9, 30
    table = torch.randint(0, 4, (num_users, num_items), generator=torch.Generator().manual_seed(5)).float()
    ev = Evaluator(num_users, num_items, *train, valid, test, num_negatives=8, seed=2)
    ks = (1, 3, 10)
    got = ev.evaluate(TableModel(table), split, ks)
    for protocol in ("sampled", "full"):
        want = _brute_force(table, train, valid, test, split, protocol, ev.negatives, ks)
        assert got[protocol] == pytest.approx(want, abs=1e-12), protocol


def test_constant_model_gets_k_over_n_plus_one():
    train, valid, test = _tiny(seed=4, num_items=40)
    ev = Evaluator(9, 40, *train, valid, test, num_negatives=20)
    flat = TableModel(torch.zeros(9, 40))
    res = ev.evaluate(flat, "test", ks=(5, 10))
    assert res["sampled"]["HR@5"] == pytest.approx(5 / 21)
    assert res["sampled"]["HR@10"] == pytest.approx(10 / 21)
    ndcg10 = sum(_dcg(r, 10) for r in range(21)) / 21
    assert res["sampled"]["NDCG@10"] == pytest.approx(ndcg10)
    # full ranking: n + 1 = items not masked at test time (train + valid), per user
    users, _ = ev.heldout["test"]
    known = torch.bincount(torch.cat([train[0], valid[0]]), minlength=9)
    expected = torch.tensor([min(10, 40 - known[u]) / (40 - known[u]) for u in users.tolist()])
    assert res["full"]["HR@10"] == pytest.approx(expected.mean().item())


@pytest.mark.parametrize("multi_test", [False, True])
def test_results_do_not_depend_on_batch_size(multi_test):
    train, valid, test = _tiny(seed=6, multi_test=multi_test)
    table = torch.randint(0, 3, (9, 30), generator=torch.Generator().manual_seed(7)).float()
    ev = Evaluator(9, 30, *train, valid, test, num_negatives=10)
    assert ev.protocols == (("per_user",) if multi_test else ("sampled", "full"))
    runs = [ev.evaluate(TableModel(table), "test", (1, 5, 20), batch_size=b) for b in (1, 2, 7, 4096)]
    assert all(r == runs[0] for r in runs[1:]) and list(runs[0]) == list(ev.protocols)


def test_one_callback_is_enough():
    train, valid, test = _tiny(seed=8)
    table = torch.randn(9, 30, generator=torch.Generator().manual_seed(9))
    ev = Evaluator(9, 30, *train, valid, test, num_negatives=10)
    both = ev.evaluate(TableModel(table), "valid")
    m = TableModel(table)
    assert ev.evaluate(score=m.score) == both  # same floats, compared the same way
    assert ev.evaluate(score_all=m.score_all) == both


def test_negatives_are_fresh_distinct_seeded_and_cover_dense_users():
    num_users, num_items, n = 50, 60, 20
    g = torch.Generator().manual_seed(0)
    users, items = [], []
    for u in range(num_users):
        k = 58 - n if u == 0 else int(torch.randint(1, 30, (1,), generator=g))  # user 0: dense
        chosen = torch.randperm(num_items, generator=g)[:k + 2].tolist()
        users += [u] * k
        items += chosen[:k]
    train = (torch.tensor(users), torch.tensor(items))
    held_u = torch.arange(num_users)
    held_i = torch.tensor([sorted(set(range(num_items)) - set(items[j] for j in range(len(users)) if users[j] == u))[0]
                           for u in range(num_users)])
    ev = Evaluator(num_users, num_items, *train, (held_u, held_i), None, num_negatives=n, seed=1)
    negs = ev.negatives
    assert negs.shape == (num_users, n)
    for u in range(num_users):
        row = negs[u].tolist()
        touched = {items[j] for j in range(len(users)) if users[j] == u} | {int(held_i[u])}
        assert len(set(row)) == n and not set(row) & touched and min(row) >= 0
    again = Evaluator(num_users, num_items, *train, (held_u, held_i), None, num_negatives=n, seed=1)
    assert torch.equal(again.negatives, negs)
    other = Evaluator(num_users, num_items, *train, (held_u, held_i), None, num_negatives=n, seed=2)
    assert not torch.equal(other.negatives, negs)


def test_negatives_are_uniform():
    # One user, 10 items touched out of 40: each of the 30 others must appear with
    # probability 5/30 per draw set; 1000 seeds -> count ~ Binomial(1000, 1/6), sd ~ 11.8;
    # 5 sd over 30 items fails by chance with probability ~2e-5 (and the seeds are fixed).
    train = (torch.zeros(9, dtype=torch.int64), torch.arange(9))
    held = (torch.tensor([0]), torch.tensor([9]))
    counts = torch.zeros(40)
    for seed in range(1000):
        ev = Evaluator(1, 40, *train, held, None, num_negatives=5, seed=seed)
        counts[ev.negatives[0]] += 1
    assert counts[:10].sum() == 0
    assert (counts[10:] - 1000 / 6).abs().max() < 5 * 11.8


def test_errors():
    train, valid, test = _tiny()
    ev = Evaluator(9, 30, *train, valid, test, num_negatives=5)
    m = TableModel(torch.randn(9, 30))
    with pytest.raises(ValueError, match="split"):
        ev.evaluate(m, "train")
    with pytest.raises(ValueError, match="ks"):
        ev.evaluate(m, ks=(0,))
    with pytest.raises(ValueError, match="protocols"):
        ev.evaluate(m, protocols=("popular",))
    with pytest.raises(TypeError, match="model"):
        ev.evaluate(object())
    with pytest.raises(ValueError, match="NaN"):
        ev.evaluate(TableModel(torch.full((9, 30), float("nan"))))
    with pytest.raises(ValueError, match="shape"):
        ev.evaluate(score_all=lambda u: torch.zeros(u.numel(), 3), protocols=("full",))
    with pytest.raises(ValueError, match="num_negatives"):
        Evaluator(9, 30, *train, valid, test, num_negatives=29).negatives
    with pytest.raises(ValueError, match="items"):
        Evaluator(9, 30, train[0], train[1] + 100)
    with pytest.raises(TypeError, match="num_items"):
        Evaluator(9, 0, *train)


def test_evaluate_function_and_format():
    from hdccf_triton.data import Dataset

    train, valid, test = _tiny()
    per_user = lambda pairs: torch.full((9,), -1, dtype=torch.int64).index_put_((pairs[0],), pairs[1])  # noqa: E731
    ds = Dataset("tiny", 9, 30, *train, per_user(valid), per_user(test))
    m = TableModel(torch.randn(9, 30, generator=torch.Generator().manual_seed(0)))
    res = evaluate(m, ds, "test", ks=(10,), num_negatives=10)
    assert set(res) == {"sampled", "full"} and set(res["full"]) == {"HR@10", "NDCG@10"}
    ev = Evaluator.from_dataset(ds, num_negatives=10)
    assert evaluate(m, ev, "test", ks=(10,)) == res
    text = format_results(res, num_negatives=10)
    assert "paper protocol" in text and "Krichene" in text
