"""Per-user Recall@K / NDCG@K / Precision@K / HitRate@K on given held-out sets, against brute force."""

import math

import pytest
import torch

from hdccf_triton.metrics import Evaluator, per_user_metrics, top_k_items


class Scores:
    """A model given by its score matrix; counts the score_all calls."""

    def __init__(self, S):
        self.S, self.calls = S, 0

    def score_all(self, users):
        self.calls += 1
        return self.S[users].clone()


def brute_force(S, known, heldout, k):
    """LightGCN's definitions, one user at a time: rank the items not known, ties by item id."""
    per_user = {name: [] for name in ("Recall", "NDCG", "Precision", "HitRate")}
    for u in sorted({u for u, _ in heldout}):
        relevant = {i for v, i in heldout if v == u}
        candidates = [i for i in range(S.shape[1]) if (u, i) not in known and S[u, i] > -math.inf]
        top = sorted(candidates, key=lambda i: (-float(S[u, i]), i))[:k]
        hits = [i in relevant for i in top]
        dcg = sum(1 / math.log2(r + 2) for r, h in enumerate(hits) if h)
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(relevant), k)))
        per_user["Recall"].append(sum(hits) / len(relevant))
        per_user["Precision"].append(sum(hits) / k)
        per_user["HitRate"].append(float(any(hits)))
        per_user["NDCG"].append(dcg / idcg)
    return {f"{name}@{k}": sum(v) / len(v) for name, v in per_user.items()}


def random_split(num_users=37, num_items=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randperm(num_users * num_items, generator=g)[: num_users * num_items // 2]
    users, items = pairs // num_items, pairs % num_items
    part = torch.rand(users.numel(), generator=g)
    train, valid, test = part < 0.6, (part >= 0.6) & (part < 0.7), part >= 0.7
    return [(users[m], items[m]) for m in (train, valid, test)]


@pytest.mark.parametrize("rounding", [None, 1, 0], ids=["distinct", "ties", "many-ties"])
def test_per_user_metrics_match_brute_force(rounding):
    (tu, ti), valid, test = random_split()
    S = torch.randn(37, 29, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if rounding is not None:
        S = S.round(decimals=rounding)  # ties across and inside the top K
    evaluator = Evaluator(37, 29, tu, ti, valid, test)
    assert evaluator.heldout_kind == "sets" and evaluator.protocols == ("per_user",)
    train = set(zip(tu.tolist(), ti.tolist()))
    for split, known in (("valid", train), ("test", train | set(zip(*(t.tolist() for t in valid))))):
        heldout = list(zip(*(t.tolist() for t in evaluator.heldout[split])))
        got = evaluator.evaluate(Scores(S), split, ks=(1, 5, 10), batch_size=7)["per_user"]
        for k in (1, 5, 10):
            want = brute_force(S, known, heldout, k)
            for name, value in want.items():
                assert got[name] == pytest.approx(value, abs=1e-12), (split, name)


def test_constant_scores_rank_by_item_id():
    scores = torch.zeros(2, 6)
    scores[1, 5] = 1.0
    values, items = top_k_items(scores, 3)
    assert items.tolist() == [[0, 1, 2], [5, 0, 1]] and values.tolist() == [[0, 0, 0], [1, 0, 0]]
    scores = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0, -math.inf]])
    assert top_k_items(scores, 2)[1].tolist() == [[0, 2]]  # three items tie for two places
    assert top_k_items(scores, 4)[1].tolist() == [[0, 2, 4, 3]]


def test_ideal_dcg_counts_at_most_k_relevant_items():
    hits = torch.tensor([[True, False, True], [True, True, True]])
    out = per_user_metrics(hits, torch.tensor([5, 3]), ks=(3,))
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert out["NDCG@3"].tolist() == pytest.approx([(1 + 1 / math.log2(4)) / idcg, 1.0])
    assert out["Recall@3"].tolist() == pytest.approx([2 / 5, 1.0])
    assert out["Precision@3"].tolist() == pytest.approx([2 / 3, 1.0])
    assert out["HitRate@3"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="num_relevant"):
        per_user_metrics(hits, torch.tensor([0, 1]), ks=(3,))


def test_on_leave_one_out_data_recall_and_hit_rate_are_the_full_protocols_hr():
    g = torch.Generator().manual_seed(2)
    U, I = 30, 40
    tu = torch.arange(U).repeat_interleave(5)
    ti = torch.randint(0, I, (U * 5,), generator=g)
    held = torch.randperm(U * I, generator=g)
    held = held[~torch.isin(held, tu * I + ti)][: 2 * U]
    users, items = torch.arange(U), held[:U] % I  # one test item per user, not in train
    keep = ~torch.isin(users * I + items, tu * I + ti)
    evaluator = Evaluator(U, I, tu, ti, None, (users[keep], items[keep]))
    assert evaluator.heldout_kind == "leave_one_out" and evaluator.protocols == ("sampled", "full")
    model = Scores(torch.randn(U, I, generator=g))
    r = evaluator.evaluate(model, "test", ks=(5, 10), protocols=("full", "per_user"))
    for k in (5, 10):
        assert r["per_user"][f"Recall@{k}"] == pytest.approx(r["full"][f"HR@{k}"])
        assert r["per_user"][f"HitRate@{k}"] == pytest.approx(r["full"][f"HR@{k}"])
        assert r["per_user"][f"NDCG@{k}"] == pytest.approx(r["full"][f"NDCG@{k}"])


def test_offsets_score_the_model_once_and_equal_a_prior_in_the_model():
    (tu, ti), valid, test = random_split(seed=3)
    S = torch.randn(37, 29, generator=torch.Generator().manual_seed(4))
    prior = torch.linspace(-1, 1, 29)
    for heldout, protocols in (("sets", ("per_user",)), ("leave_one_out", ("sampled", "full", "per_user"))):
        if heldout == "leave_one_out":  # the first test item of each user
            first = {}
            for n, u in enumerate(test[0].tolist()):
                first.setdefault(u, n)
            rows = torch.tensor(list(first.values()))
            valid_, test_ = None, (test[0][rows], test[1][rows])
        else:
            valid_, test_ = valid, test
        evaluator = Evaluator(37, 29, tu, ti, valid_, test_, heldout=heldout, num_negatives=5)
        model = Scores(S)
        both = evaluator.evaluate(model, "test", ks=(3,), protocols=protocols, batch_size=10,
                                  item_offsets={"a": 0.5 * prior, "b": torch.zeros(29)})
        chunks = -(-evaluator.heldout["test"][0].numel() // 10)
        assert model.calls <= len(protocols) * chunks  # not once per offset
        for key, offset in (("a", 0.5 * prior), ("b", torch.zeros(29))):
            alone = evaluator.evaluate(Scores(S + offset), "test", ks=(3,), protocols=protocols, batch_size=10)
            assert both[key] == alone


def test_bad_requests_are_refused_with_the_reason():
    (tu, ti), valid, test = random_split()
    evaluator = Evaluator(37, 29, tu, ti, valid, test)
    model = Scores(torch.randn(37, 29))
    with pytest.raises(ValueError, match="one held-out item per user; these are held-out sets"):
        evaluator.evaluate(model, "test", protocols=("sampled",))
    with pytest.raises(ValueError, match="ks: cut-off 50 exceeds the 29 items"):
        evaluator.evaluate(model, "test", ks=(10, 50))
    with pytest.raises(ValueError, match="heldout='leave_one_out'"):
        Evaluator(37, 29, tu, ti, valid, test, heldout="leave_one_out")
    with pytest.raises(ValueError, match=r"item_offsets\['x'\]"):
        evaluator.evaluate(model, "test", ks=(5,), item_offsets={"x": torch.zeros(3)})


def test_a_given_test_set_makes_the_evaluator_per_user(tmp_path):
    from hdccf_triton import load_dataset

    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "train.txt").write_text("0 1 2 3 4\n1 0 2 4\n2 3 5\n")
    (tmp_path / "g" / "test.txt").write_text("0 0\n1 1 3\n2 4\n")
    ds = load_dataset(tmp_path / "g", min_item_interactions=5)  # never applied to a given split
    assert ds.num_items == 6 and ds.stats["filters"].startswith("not applied")
    evaluator = Evaluator.from_dataset(ds)
    assert evaluator.heldout_kind == "sets" and evaluator.selection == ("per_user", "Recall@20")
