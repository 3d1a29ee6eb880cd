"""The PyTorch reference against hdccf_triton/LOSS.md: a hand-worked batch, a literal Decimal oracle,
gradcheck, and the identities the spec implies."""

import math

import pytest
import torch

import hdccf_triton.backends.reference as reference
import hdccf_triton.interactions as interactions
from hdccf_triton.backends.reference import _observed_from_lists
from batches import make_batch
from hdccf_triton import InteractionIndex, LossOptions, debiased_contrastive_loss
from hdccf_triton.terms import LossInputs
from naive import naive_row_losses

t = lambda x, dtype=torch.float64: torch.tensor(x, dtype=dtype)  # noqa: E731
e = math.exp
ln = math.log


# ---------------------------------------------------------------------------------------------
# A batch worked by hand: M = 3, P = 2, d = 1, τ = 1, so every score is a product of two numbers.
# Flattened pools (column j = m·P + p):  X = [0.5, 1, -1, 0, 2, 1]   Y = [1, 0, 0.5, -0.5, 1, 2]
# Row 0: u = 1, i = 1, s = 1; its own block is j ∈ {0, 1}, its negatives j ∈ {2, 3, 4, 5}.
#   A[0, j] = E[0, j] = X_j,   B[0, j] = C[0, j] = Y_j.
# ---------------------------------------------------------------------------------------------
HAND = dict(
    user_emb=t([[1.0], [0.5], [-1.0]]),
    item_emb=t([[1.0], [2.0], [0.5]]),
    pool_item_emb=t([[[0.5], [1.0]], [[-1.0], [0.0]], [[2.0], [1.0]]]),
    pool_user_emb=t([[[1.0], [0.0]], [[0.5], [-0.5]], [[1.0], [2.0]]]),
    users=torch.tensor([0, 1, 2]),
    items=torch.tensor([0, 1, 2]),
    pool_items=torch.tensor([[3, 4], [0, 5], [6, 4]]),  # X ids: [3, 4, 0, 5, 6, 4]
    pool_users=torch.tensor([[1, 2], [0, 3], [4, 0]]),  # Y ids: [1, 2, 0, 3, 4, 0]
)
# D: user 0 saw items 0, 3, 4, 5; the pools of the other rows are consistent with D.
HAND_D = [(0, 0), (0, 3), (0, 4), (0, 5), (1, 0), (2, 0), (1, 1), (0, 1), (3, 1), (1, 5),
          (2, 2), (2, 6), (2, 4), (4, 2), (0, 2)]


def hand_loss(**kw):
    index = InteractionIndex.from_pairs(*zip(*HAND_D), num_users=5, num_items=7)
    return debiased_contrastive_loss(
        *HAND.values(), interactions=index, temperature=1.0, reduction="none", backend="torch", **kw
    )


def test_hand_worked_biased_row():
    # Biased (eqs. 1, 5): every negative counts. Negatives of row 0: A = [-1, 0, 2, 1],
    # B = C = [0.5, -0.5, 1, 2]; own block C = [1, 0], E = [0.5, 1].
    F_U = e(0.5) + e(-0.5) + e(1) + e(2)
    F_I = e(-1) + e(0) + e(2) + e(1)
    L_ui = -1 + ln(e(1) + F_U + F_I)
    L_uu = sum(-c + ln(e(c) + F_U) for c in (1.0, 0.0))  # G^U = Σ_neg e^C = F_U here
    L_ii = sum(-x + ln(e(x) + F_I) for x in (0.5, 1.0))  # G^I = Σ_neg e^E = F_I here
    got = hand_loss(debias=False, lambda_user=0.5, lambda_item=2.0)
    assert got[0].item() == pytest.approx(L_ui + 0.5 * L_uu + 2.0 * L_ii, rel=1e-12)


def test_hand_worked_debiased_row():
    # Negatives of row 0 are columns 2..5 with X ids [0, 5, 6, 4] and Y ids [0, 3, 4, 0].
    # φᴵ: j=2 is i_0 itself, (0,5) and (0,4) are in D  ->  Tᴵ = {4}, nᴵ = 1 (A_4 = E_4 = 2).
    # φᵁ: j=2 and j=5 are u_0 itself; (3,0), (4,0) are not in D  ->  Tᵁ = {3, 4}, nᵁ = 2.
    Q, P = 4, 2
    w_u, w_i = 0.5, 0.25
    F_U = Q / ((1 - w_u) * 2) * (e(-0.5) + e(1)) - Q * w_u / ((1 - w_u) * (P + 1)) * (e(1) + e(1) + e(0))
    F_I = Q / ((1 - w_i) * 1) * e(2) - Q * w_i / ((1 - w_i) * (P + 1)) * (e(1) + e(0.5) + e(1))
    assert F_U > Q * e(-1) and F_I > Q * e(-1)  # the floor does not bind here
    L_ui = -1 + ln(e(1) + F_U + F_I)
    G_U = Q / 2 * (e(-0.5) + e(1))
    G_I = Q / 1 * e(2)
    L_uu = sum(-c + ln(e(c) + G_U) for c in (1.0, 0.0))
    L_ii = sum(-x + ln(e(x) + G_I) for x in (0.5, 1.0))
    got = hand_loss(omega_user=w_u, omega_item=w_i)
    assert got[0].item() == pytest.approx(L_ui + L_uu + L_ii, rel=1e-12)

    # With ω_u = 0.9 the correction overshoots: Fᵁ falls to the floor Q·e^{-1}.
    w_u = 0.9
    raw = Q / ((1 - w_u) * 2) * (e(-0.5) + e(1)) - Q * w_u / ((1 - w_u) * (P + 1)) * (2 * e(1) + 1)
    assert raw < Q * e(-1)
    L_ui = -1 + ln(e(1) + Q * e(-1) + F_I)
    got = hand_loss(omega_user=w_u, omega_item=w_i)
    assert got[0].item() == pytest.approx(L_ui + L_uu + L_ii, rel=1e-12)


def test_hand_worked_batch_matches_literal_oracle():
    for kw in (dict(debias=False), dict(omega_user=0.5, omega_item=0.25), dict(omega_user=0.9)):
        want = naive_row_losses(*HAND.values(), pairs=HAND_D, temperature=1.0, **kw)
        assert hand_loss(**kw).tolist() == pytest.approx([float(x) for x in want], rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Random batches against the literal oracle.
# ---------------------------------------------------------------------------------------------
CONFIGS = [
    dict(debias=False),
    dict(debias=True),
    dict(debias=True, omega_user=0.3, omega_item=0.6),
    dict(debias=True, omega_user=0.95, omega_item=0.9, temperature=0.5),  # floor binds often
    dict(debias=True, omega_user=0.2, lambda_user=0.0, lambda_item=2.5),
]


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("use_index", [True, False])
def test_matches_literal_oracle(similarity, config, use_index):
    b = make_batch(M=5, P=3, d=4, seed=1, scale=0.8)
    got = debiased_contrastive_loss(
        *b.tensors, interactions=b.index if use_index else None, similarity=similarity,
        reduction="none", backend="torch", **config,
    )
    want = naive_row_losses(*b.tensors, pairs=b.pairs if use_index else (), similarity=similarity, **config)
    assert got.tolist() == pytest.approx([float(x) for x in want], rel=1e-11, abs=1e-11)


def test_floor_binds_with_zero_gradient_through_the_negatives():
    # Own blocks that copy the anchor score far above the negatives, and ω = 0.99: the
    # correction b exceeds a in every row, so Fᵁ = Fᴵ = Q·e^{-1/τ} (a constant).
    b = make_batch(M=5, P=2, d=3, seed=3, scale=1.0)
    user_emb = b.user_emb.clone().requires_grad_()
    item_emb = b.item_emb.clone().requires_grad_()
    pool_item_emb = b.user_emb[:, None, :].repeat(1, 2, 1).requires_grad_()
    pool_user_emb = b.item_emb[:, None, :].repeat(1, 2, 1).requires_grad_()
    tensors = (user_emb, item_emb, pool_item_emb, pool_user_emb, *b.tensors[4:])
    kw = dict(omega_user=0.99, omega_item=0.99, temperature=0.5, lambda_user=0, lambda_item=0)
    loss = debiased_contrastive_loss(*tensors, interactions=b.index, reduction="none", backend="torch", **kw)
    Q, s = 2 * 4, (b.user_emb * b.item_emb).sum(-1) / 0.5
    floor_only = -s + torch.log(s.exp() + 2 * Q * math.exp(-2.0))
    torch.testing.assert_close(loss.detach(), floor_only, rtol=1e-12, atol=1e-12)
    want = naive_row_losses(*tensors, pairs=b.pairs, **kw)
    assert loss.tolist() == pytest.approx([float(x) for x in want], rel=1e-12)
    loss.sum().backward()
    assert pool_item_emb.grad.abs().max() == 0 and pool_user_emb.grad.abs().max() == 0
    assert torch.isfinite(user_emb.grad).all() and user_emb.grad.abs().max() > 0


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("config", CONFIGS[:4], ids=["biased", "debiased", "omega", "floor"])
def test_gradcheck(similarity, config):
    b = make_batch(M=4, P=2, d=3, seed=2, scale=0.7, requires_grad=True)
    upstream = torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def f(*embeddings):
        out = debiased_contrastive_loss(
            *b.with_embeddings(*embeddings), interactions=b.index, similarity=similarity,
            reduction="none", backend="torch", **config,
        )
        return (out * upstream).sum()

    assert torch.autograd.gradcheck(f, b.embeddings, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_debiased_without_false_negatives_equals_biased():
    # Distinct ids everywhere and an index that pairs nobody across rows: no false negatives.
    M, P = 5, 2
    b = make_batch(M=M, P=P, d=4, seed=4, scale=0.6)
    users, items = torch.arange(M), torch.arange(M)
    pool_items = torch.arange(M, M + M * P).view(M, P)
    pool_users = torch.arange(M, M + M * P).view(M, P)
    own = [(k, k) for k in range(M)]
    own += [(k, int(i)) for k in range(M) for i in pool_items[k]]
    own += [(int(u), k) for k in range(M) for u in pool_users[k]]
    index = InteractionIndex.from_pairs(*zip(*own), num_users=M * (P + 1), num_items=M * (P + 1))
    args = (*b.embeddings, users, items, pool_items, pool_users)
    kw = dict(interactions=index, reduction="none", backend="torch", temperature=0.2)
    debiased = debiased_contrastive_loss(*args, debias=True, **kw)
    biased = debiased_contrastive_loss(*args, debias=False, **kw)
    torch.testing.assert_close(debiased, biased, rtol=1e-12, atol=1e-12)


def test_row_permutation_permutes_the_losses():
    b = make_batch(M=7, P=3, d=5, seed=6, scale=0.5)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    kw = dict(interactions=b.index, omega_user=0.2, omega_item=0.1, reduction="none", backend="torch")
    base = debiased_contrastive_loss(*b.tensors, **kw)
    permuted = debiased_contrastive_loss(*(x[perm] for x in b.tensors), **kw)
    torch.testing.assert_close(permuted, base[perm], rtol=1e-12, atol=1e-12)


def test_single_row_has_no_negatives():
    b = make_batch(M=1, P=3, d=4, seed=7, scale=0.5)
    got = debiased_contrastive_loss(*b.tensors, interactions=b.index, omega_user=0.5,
                                    reduction="none", backend="torch")
    # F = G = 0: L_ui = 0 and each own-block term is −c + log(e^c) = 0.
    assert got.tolist() == [0.0]
    want = naive_row_losses(*b.tensors, pairs=b.pairs, omega_user=0.5)
    assert abs(float(want[0])) < 1e-50  # Decimal rounding of −c + ln(e^c)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_large_scores_are_exact(sign):
    # Scores of several hundred: e^{±500} overflows float64 without the max shift.
    b = make_batch(M=4, P=2, d=3, seed=8, scale=1.0)
    tensors = list(b.tensors)
    tensors[0] = tensors[0] * 6.0 * sign
    tensors[2] = tensors[2] * 6.0
    tensors[3] = tensors[3] * 6.0
    kw = dict(temperature=0.05, omega_user=0.1, omega_item=0.1)
    got = debiased_contrastive_loss(*tensors, interactions=b.index, reduction="none", backend="torch", **kw)
    scores = tensors[0] @ tensors[2].reshape(-1, 3).T / 0.05
    assert scores.abs().max() > 300
    want = naive_row_losses(*tensors, pairs=b.pairs, **kw)
    assert got.tolist() == pytest.approx([float(x) for x in want], rel=1e-10, abs=1e-9)


def test_rows_whose_negatives_are_all_false_negatives():
    # Every user saw every item: no true negative anywhere, every F is the floor, every G is 0.
    b = make_batch(M=4, P=2, d=3, seed=9, scale=0.5, requires_grad=True)
    pairs = [(u, i) for u in range(7) for i in range(9)]
    index = InteractionIndex.from_pairs(*zip(*pairs), num_users=7, num_items=9)
    loss = debiased_contrastive_loss(*b.tensors, interactions=index, omega_user=0.3,
                                     reduction="none", backend="torch")
    want = naive_row_losses(*b.tensors, pairs=pairs, omega_user=0.3)
    assert loss.tolist() == pytest.approx([float(x) for x in want], rel=1e-12)
    loss.sum().backward()
    for x in b.embeddings:
        assert torch.isfinite(x.grad).all()
    assert b.pool_item_emb.grad.abs().max() == 0  # only the floor and s_k remain


def test_chunked_rows_match_one_chunk():
    b = make_batch(M=9, P=3, d=4, seed=10, scale=0.7, requires_grad=True)
    options = LossOptions(omega_user=0.3, omega_item=0.2, similarity="cosine")
    upstream = torch.rand(9, dtype=torch.float64)

    def run(chunk_elements):
        for x in b.embeddings:
            x.grad = None
        out = reference.per_row_loss(LossInputs(*b.tensors), b.index, options, chunk_elements=chunk_elements)
        (out * upstream).sum().backward()
        return out.detach(), [x.grad.clone() for x in b.embeddings]

    whole, whole_grads = run(reference.CHUNK_ELEMENTS)
    chunked, chunked_grads = run(2 * 27)  # chunks of 2 rows, checkpointed
    torch.testing.assert_close(chunked, whole, rtol=1e-13, atol=1e-13)
    for g1, g2 in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lower_precision_inputs_accumulate_in_float32(dtype):
    b = make_batch(M=6, P=2, d=8, seed=11, scale=0.5)
    low = [x.to(dtype).requires_grad_() for x in b.embeddings]
    out = debiased_contrastive_loss(*b.with_embeddings(*low), interactions=b.index, reduction="none",
                                    backend="torch", omega_user=0.2)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert all(x.grad.dtype == dtype for x in low)
    exact = debiased_contrastive_loss(*b.with_embeddings(*(x.detach().double() for x in low)),
                                      interactions=b.index, reduction="none", backend="torch",
                                      omega_user=0.2)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


def test_reductions():
    b = make_batch(M=5, P=2, d=3, seed=12)
    kw = dict(interactions=b.index, backend="torch")
    rows = debiased_contrastive_loss(*b.tensors, reduction="none", **kw)
    assert rows.shape == (5,)
    torch.testing.assert_close(debiased_contrastive_loss(*b.tensors, reduction="sum", **kw), rows.sum())
    torch.testing.assert_close(debiased_contrastive_loss(*b.tensors, reduction="mean", **kw), rows.mean())
    torch.testing.assert_close(debiased_contrastive_loss(*b.tensors, **kw), rows.mean())


def test_same_inputs_same_bits():
    b = make_batch(M=8, P=2, d=4, seed=13, dtype=torch.float32, requires_grad=True)
    results = []
    for _ in range(2):
        for x in b.embeddings:
            x.grad = None
        loss = debiased_contrastive_loss(*b.tensors, interactions=b.index, backend="torch", omega_user=0.1)
        loss.backward()
        results.append([loss.detach()] + [x.grad.clone() for x in b.embeddings])
    for a, c in zip(*results):
        assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# The reference's fast paths: kept or recomputed softmax weights, row tables or lookups, and
# rows whose masked sum would underflow
# ---------------------------------------------------------------------------------------------


def _reference_loss_and_grads(b, options, upstream, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in b.embeddings]
    loss = reference.per_row_loss(LossInputs(*leaves, *b.tensors[4:]), b.index, options, **kw)
    return loss.detach(), torch.autograd.grad(loss, leaves, upstream)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("debias", [True, False])
def test_recomputed_and_chunked_weights_match_the_kept_ones(similarity, debias):
    b = make_batch(M=9, P=3, d=5, seed=21, scale=1.5)
    options = LossOptions(similarity=similarity, debias=debias, omega_user=0.2, temperature=0.2)
    upstream = torch.linspace(-0.7, 1.9, 9, dtype=torch.float64)
    kept, kept_grads = _reference_loss_and_grads(b, options, upstream)
    for kw in (dict(saved_weight_elements=0), dict(saved_weight_elements=0, chunk_elements=2 * 27),
               dict(chunk_elements=2 * 27), dict(saved_weight_elements=0, mask_elements=0, chunk_elements=2 * 27),
               dict(mask_elements=0)):  # recomputed, in chunks of 2 rows, kept in chunks, bool masks
        got, grads = _reference_loss_and_grads(b, options, upstream, **kw)
        torch.testing.assert_close(got, kept, rtol=1e-13, atol=1e-13, msg=str(kw))
        for a, w in zip(grads, kept_grads):
            torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-13, msg=str(kw))


def _brute_force_masks(b, index, debias, row_offset=0):
    M, P = b.users.numel(), b.pool_items.shape[1]
    pairs = set(zip(index.keys.div(index.num_items, rounding_mode="floor").tolist(),
                    (index.keys % index.num_items).tolist())) if index is not None else set()
    x_ids, y_ids = b.pool_items.reshape(-1).tolist(), b.pool_users.reshape(-1).tolist()
    t_item = torch.zeros(M, len(x_ids), dtype=torch.bool)
    t_user = torch.zeros_like(t_item)
    for k in range(M):
        u, i = int(b.users[k]), int(b.items[k])
        for j in range(len(x_ids)):
            if j // P == row_offset + k:
                continue
            t_item[k, j] = not debias or not (x_ids[j] == i or (u, x_ids[j]) in pairs)
            t_user[k, j] = not debias or not (y_ids[j] == u or (y_ids[j], i) in pairs)
    return t_item, t_user


@pytest.mark.parametrize("index_kind", ["dense", "lists", "lookups", "none"])
@pytest.mark.parametrize("debias", [True, False])
def test_true_negative_masks_match_brute_force(index_kind, debias, monkeypatch):
    b = make_batch(M=7, P=2, d=3, seed=4, density=0.4)
    index = None if index_kind == "none" else b.index
    if index_kind != "dense":  # no dense table: the anchors' lists, or a lookup per pair
        monkeypatch.setattr(interactions, "TABLE_MAX_BYTES", 0)
    monkeypatch.setattr(reference, "LISTS_MAX_FRACTION", {"lookups": 0.0, "lists": math.inf}.get(index_kind, 0.1))
    assert (index is not None and index.table("items") is not None) == (index_kind == "dense")
    calls = []
    monkeypatch.setattr(reference, "_observed_from_lists", lambda *a: calls.append(1) or lists(*a))
    lists = _observed_from_lists
    got = reference.true_negative_masks(b.tensors[4:], index, debias, 0)
    want = _brute_force_masks(b, index, debias)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(calls) == (2 if index_kind == "lists" and debias else 0)  # the path named is the path taken
    assert (~got[0]).any()  # the case has false negatives beyond the own blocks


def test_rows_whose_masked_sum_underflows_are_redone():
    # row 0's only true negative item scores 2000 below its false negative: e^(s − max) underflows
    # even in float64, so the row must be shifted by its true-negative maximum
    users, items = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])
    pool_items, pool_users = torch.tensor([[0], [3], [4]]), torch.tensor([[0], [1], [2]])
    index = InteractionIndex.from_pairs([0, 0, 1, 2], [0, 3, 1, 2], 3, 5)  # (u0, item 3) observed: a false negative
    emb = lambda *rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    user_emb, item_emb = emb([10.0, 0.0], [0.1, 0.2], [0.3, -0.1]), emb([1.0, 0.0], [0.2, 0.1], [0.0, 0.4])
    pool_item_emb = emb([[1.0, 0.0]], [[10.0, 0.0]], [[-1.0, 0.0]])  # item 3 scores 2000, item 4 −200 for row 0
    pool_user_emb = emb([[0.1, 0.0]], [[0.2, 0.1]], [[0.0, 0.1]])
    options = LossOptions(temperature=0.05)
    tensors = [user_emb, item_emb, pool_item_emb, pool_user_emb]
    prepared = LossInputs(*tensors, users, items, pool_items, pool_users)
    stats = reference.negative_statistics(prepared, index, options)
    assert stats.n_item[0] == 1 and stats.lse_A[0].item() == pytest.approx(-200.0, rel=1e-12)
    leaves = [t.clone().requires_grad_() for t in tensors]
    loss = reference.per_row_loss(LossInputs(*leaves, users, items, pool_items, pool_users), index, options)
    grads = torch.autograd.grad(loss.sum(), leaves)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    want = naive_row_losses(*tensors, users, items, pool_items, pool_users, pairs=[(0, 0), (0, 3), (1, 1), (2, 2)],
                            temperature=0.05)
    assert loss.tolist() == pytest.approx([float(x) for x in want], rel=1e-10)
