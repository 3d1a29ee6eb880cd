"""The sampling-bias correction (logQ) and the mixed negatives of hdccf_triton/LOSS.md in the
PyTorch reference: against the literal Decimal oracle, gradcheck, the identities the definition
implies, bad input, and the sampler's estimates and draws."""

import math

import pytest
import torch

import hdccf_triton.backends.reference as reference
from batches import make_batch
from hdccf_triton import (DebiasedContrastiveLoss, EmbeddingModel, ExtraNegatives, HDCCFObjective, InBatchSampler,
                          InteractionIndex, debiased_contrastive_loss)
from naive import naive_row_losses

NUM_USERS, NUM_ITEMS = 7, 9  # make_batch's id ranges


def extras(B=3, d=4, seed=3, scale=0.8, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    xe = torch.randn(B, d, dtype=torch.float64, generator=g) * scale
    ye = torch.randn(B, d, dtype=torch.float64, generator=g) * scale
    if requires_grad:
        xe, ye = xe.requires_grad_(), ye.requires_grad_()
    return ExtraNegatives(xe, ye, torch.randint(0, NUM_ITEMS, (B,), generator=g),
                          torch.randint(0, NUM_USERS, (B,), generator=g))


def tables(seed=4, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(NUM_ITEMS, dtype=torch.float64, generator=g) * scale,
            torch.randn(NUM_USERS, dtype=torch.float64, generator=g) * scale)


def options_for(kind, extra, item_q, user_q):
    return {"logq": dict(item_log_q=item_q, user_log_q=user_q),
            "items_only": dict(item_log_q=item_q),
            "mixed": dict(extra_negatives=extra),
            "both": dict(item_log_q=item_q, user_log_q=user_q, extra_negatives=extra)}[kind]


CONFIGS = [dict(debias=False), dict(), dict(omega_user=0.3, omega_item=0.2), dict(temperature=0.05)]


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("config", CONFIGS, ids=["biased", "debiased", "omega", "floor"])
@pytest.mark.parametrize("kind", ["logq", "items_only", "mixed", "both"])
def test_matches_literal_oracle(similarity, config, kind):
    b = make_batch(M=5, P=2, d=4, seed=1, scale=0.8)
    extra, (item_q, user_q) = extras(), tables()
    kw = options_for(kind, extra, item_q, user_q)
    config = {"temperature": 0.5, **config}
    got = debiased_contrastive_loss(*b.tensors, interactions=b.index, reduction="none", similarity=similarity,
                                    backend="torch", **config, **kw)
    oracle_kw = dict(kw)
    if "extra_negatives" in kw:
        oracle_kw["extra_negatives"] = tuple(extra)
    want = naive_row_losses(*b.tensors, pairs=b.pairs, similarity=similarity, **config, **oracle_kw)
    assert got.tolist() == pytest.approx([float(x) for x in want], rel=1e-10, abs=1e-10)
    # and the option changes the loss (a test that cannot fail is a defect)
    plain = debiased_contrastive_loss(*b.tensors, interactions=b.index, reduction="none", similarity=similarity,
                                      backend="torch", **config)
    assert not torch.allclose(got, plain)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("config", CONFIGS[:3], ids=["biased", "debiased", "omega"])
@pytest.mark.parametrize("keep", [True, False], ids=["kept-weights", "recomputed"])
def test_gradcheck_with_both_options(similarity, config, keep, monkeypatch):
    if not keep:  # the backward recomputes the weights chunk by chunk, one row at a time
        monkeypatch.setattr(reference, "SAVED_WEIGHT_ELEMENTS", 0)
        monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 8)
    b = make_batch(M=4, P=2, d=3, seed=2, scale=0.7, requires_grad=True)
    extra = extras(B=3, d=3, seed=6, scale=0.7, requires_grad=True)
    item_q, user_q = tables(seed=7)
    upstream = torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def f(*embeddings):
        out = debiased_contrastive_loss(
            *b.with_embeddings(*embeddings[:4]), interactions=b.index, similarity=similarity, reduction="none",
            backend="torch", item_log_q=item_q, user_log_q=user_q,
            extra_negatives=extra.with_embeddings(*embeddings[4:]), **config,
        )
        return (out * upstream).sum()

    assert torch.autograd.gradcheck(f, (*b.embeddings, extra.item_emb, extra.user_emb), eps=1e-6, atol=1e-7,
                                    rtol=1e-6)


def test_zero_corrections_and_no_correction_are_the_same_bits():
    b = make_batch(M=6, P=3, d=4, seed=8, scale=0.9)
    plain = debiased_contrastive_loss(*b.tensors, interactions=b.index, reduction="none", backend="torch")
    zero = debiased_contrastive_loss(*b.tensors, interactions=b.index, reduction="none", backend="torch",
                                     item_log_q=torch.zeros(NUM_ITEMS, dtype=torch.float64),
                                     user_log_q=torch.zeros(NUM_USERS, dtype=torch.float64))
    assert torch.equal(plain, zero)


def test_a_constant_correction_scales_the_negatives():
    # ℓ ≡ c on every id: each sum over negatives is e^{−c} times the uncorrected one; in the
    # biased loss with λ = 0 that is L = −s + log(e^s + e^{−c}·F)
    b = make_batch(M=5, P=2, d=4, seed=9, scale=0.8)
    c = 1.7
    kw = dict(interactions=b.index, reduction="none", backend="torch", debias=False, lambda_user=0.0,
              lambda_item=0.0, temperature=0.5)
    shifted = debiased_contrastive_loss(*b.tensors, item_log_q=torch.full((NUM_ITEMS,), c, dtype=torch.float64),
                                        user_log_q=torch.full((NUM_USERS,), c, dtype=torch.float64), **kw)
    plain = debiased_contrastive_loss(*b.tensors, **kw)
    s = (b.user_emb * b.item_emb).sum(-1) / 0.5
    log_F = torch.log(torch.expm1(plain)) + s  # plain = log(1 + F e^{−s})
    want = torch.log1p(torch.exp(log_F - c - s))
    torch.testing.assert_close(shifted, want, rtol=1e-10, atol=1e-12)


def test_large_scores_with_both_options_are_exact():
    b = make_batch(M=4, P=2, d=4, seed=11, scale=6.0)
    extra, (item_q, user_q) = extras(scale=6.0), tables(scale=30.0)
    kw = dict(item_log_q=item_q, user_log_q=user_q, extra_negatives=extra)
    got = debiased_contrastive_loss(*b.tensors, interactions=b.index, reduction="none", backend="torch",
                                    omega_item=0.2, **kw)
    assert got.abs().max() > 100  # the scores are in the hundreds
    want = naive_row_losses(*b.tensors, pairs=b.pairs, omega_item=0.2, **{**kw, "extra_negatives": tuple(extra)})
    assert got.tolist() == pytest.approx([float(x) for x in want], rel=1e-10)


def test_rows_whose_negatives_are_all_false_negatives_with_mixed_negatives():
    # every user saw every item: the pool and the extra negatives are all false negatives, every
    # F is the floor Q·e^{−1/τ} with Q = P(M−1) + B′, and no gradient reaches a negative
    b = make_batch(M=4, P=2, d=3, seed=9, scale=0.5, requires_grad=True)
    extra = extras(B=3, d=3, requires_grad=True)
    pairs = [(u, i) for u in range(NUM_USERS) for i in range(NUM_ITEMS)]
    index = InteractionIndex.from_pairs(*zip(*pairs), num_users=NUM_USERS, num_items=NUM_ITEMS)
    item_q, user_q = tables()
    kw = dict(omega_user=0.3, item_log_q=item_q, user_log_q=user_q)
    loss = debiased_contrastive_loss(*b.tensors, interactions=index, reduction="none", backend="torch",
                                     extra_negatives=extra, **kw)
    want = naive_row_losses(*b.tensors, pairs=pairs, extra_negatives=tuple(extra), **kw)
    assert loss.tolist() == pytest.approx([float(x) for x in want], rel=1e-12)
    loss.sum().backward()
    assert b.pool_item_emb.grad.abs().max() == 0 and extra.item_emb.grad.abs().max() == 0
    assert extra.user_emb.grad.abs().max() == 0


def test_extra_negatives_enter_the_user_item_term_only():
    # with λ = 0 the auxiliary terms vanish; with the user–item term switched off (large ω makes
    # it the floor) ... simpler: the C and E sums read the pool only, so moving an extra user's
    # embedding changes nothing but the user–item term of the rows
    b = make_batch(M=5, P=2, d=4, seed=12, scale=0.8)
    extra = extras()
    kw = dict(interactions=b.index, reduction="none", backend="torch")
    full = debiased_contrastive_loss(*b.tensors, extra_negatives=extra, **kw)
    ui_only = debiased_contrastive_loss(*b.tensors, extra_negatives=extra, lambda_user=0.0, lambda_item=0.0, **kw)
    aux_plain = (debiased_contrastive_loss(*b.tensors, **kw)
                 - debiased_contrastive_loss(*b.tensors, lambda_user=0.0, lambda_item=0.0, **kw))
    torch.testing.assert_close(full - ui_only, aux_plain, rtol=1e-12, atol=1e-12)


def test_counts_with_mixed_negatives_match_brute_force():
    b = make_batch(M=6, P=2, d=4, seed=13)
    extra = extras(B=4)
    inputs = reference.LossInputs(*b.tensors, extra=extra)
    from hdccf_triton import LossOptions

    stats = reference.negative_statistics(inputs, b.index, LossOptions(), 0)
    D = set(b.pairs)
    x_ids = b.pool_items.reshape(-1).tolist() + extra.items.tolist()
    y_ids = b.pool_users.reshape(-1).tolist() + extra.users.tolist()
    NP = b.pool_items.numel()
    for k in range(6):
        u, i = int(b.users[k]), int(b.items[k])
        true_i = [j for j, v in enumerate(x_ids) if j // 2 != k and v != i and (u, v) not in D]
        true_u = [j for j, w in enumerate(y_ids) if j // 2 != k and w != u and (w, i) not in D]
        assert stats.n_item[k] == len(true_i) and stats.n_user[k] == len(true_u)
        assert stats.n_item_aux[k] == sum(j < NP for j in true_i)
        assert stats.n_user_aux[k] == sum(j < NP for j in true_u)


def test_a_batch_of_one_row_with_mixed_negatives_has_a_user_item_term():
    b = make_batch(M=1, P=2, d=4, seed=14)
    extra = extras()
    got = debiased_contrastive_loss(*b.tensors, interactions=b.index, reduction="none", backend="torch",
                                    extra_negatives=extra)
    want = naive_row_losses(*b.tensors, pairs=b.pairs, extra_negatives=tuple(extra))
    assert got.tolist() == pytest.approx([float(x) for x in want], rel=1e-12)
    assert float(got[0]) > 0  # without them a one-row batch has loss 0


def test_the_module_keeps_its_tables_as_buffers_and_a_call_may_override_them():
    b = make_batch(M=5, P=2, d=4, seed=15)
    item_q, user_q = tables()
    loss_fn = DebiasedContrastiveLoss(b.index, item_log_q=item_q, user_log_q=user_q, reduction="none")
    assert {name for name, _ in loss_fn.named_buffers()} == {"item_log_q", "user_log_q"}
    assert "item_log_q" not in loss_fn.state_dict()  # derived from the data, not learned
    want = debiased_contrastive_loss(*b.tensors, interactions=b.index, reduction="none", item_log_q=item_q,
                                     user_log_q=user_q)
    assert torch.equal(loss_fn(*b.tensors), want)
    zero = loss_fn(*b.tensors, item_log_q=torch.zeros_like(item_q), user_log_q=torch.zeros_like(user_q))
    assert torch.equal(zero, debiased_contrastive_loss(*b.tensors, interactions=b.index, reduction="none"))


@pytest.mark.parametrize("change, match", [
    (dict(item_log_q=torch.zeros(NUM_ITEMS, dtype=torch.int64)), "item_log_q must be a floating-point"),
    (dict(item_log_q=torch.zeros(NUM_ITEMS, 1)), r"item_log_q must have shape \[num_items\]"),
    (dict(user_log_q=torch.zeros(NUM_USERS + 2)), "user_log_q must have num_users = 7 entries"),
    (dict(item_log_q=torch.full((NUM_ITEMS,), math.nan)), "item_log_q holds non-finite"),
    (dict(item_log_q=[0.0] * NUM_ITEMS), "item_log_q must be a torch.Tensor"),
    (dict(extra_negatives=(1, 2, 3, 4)), "extra_negatives must be an ExtraNegatives"),
    (dict(extra_negatives="extras"), "extra_negatives must be an ExtraNegatives"),
])
def test_bad_options_are_named(change, match):
    b = make_batch(M=4, P=2, d=4)
    with pytest.raises((TypeError, ValueError), match=match):
        debiased_contrastive_loss(*b.tensors, interactions=b.index, backend="torch", **change)


def test_bad_extra_negatives_are_named():
    b = make_batch(M=4, P=2, d=4)
    good = extras()
    cases = [
        (good._replace(item_emb=good.item_emb[:, :3]), r"extra_negatives.item_emb must have shape \[B', d\]"),
        (good._replace(user_emb=good.user_emb[:2]), r"extra_negatives.user_emb must have shape \[B', d\] = \[3, 4\]"),
        (good._replace(user_emb=good.user_emb.float()), "extra_negatives.user_emb must have the embeddings' dtype"),
        (good._replace(items=good.items.double()), "extra_negatives.items must hold integer ids"),
        (good._replace(users=good.users[:2]), r"extra_negatives.users must have shape \[B'\] = \[3\]"),
        (good._replace(items=good.items + NUM_ITEMS), "extra_negatives.items holds id .* outside"),
        (good._replace(users=good.users - 10), "extra_negatives.users must be non-negative"),
        (good._replace(item_emb=good.item_emb * math.inf), "extra_negatives.item_emb holds non-finite"),
        (good._replace(item_emb=good.item_emb[:0], user_emb=good.user_emb[:0], items=good.items[:0],
                       users=good.users[:0]), "B' >= 1"),
    ]
    for extra, match in cases:
        with pytest.raises((TypeError, ValueError), match=match):
            debiased_contrastive_loss(*b.tensors, interactions=b.index, backend="torch", extra_negatives=extra)


def test_a_table_must_cover_the_ids_without_an_index():
    b = make_batch(M=4, P=2, d=4)
    top = int(b.pool_items.max())
    with pytest.raises(ValueError, match=f"item_log_q has {top} entries but a column has id {top}"):
        debiased_contrastive_loss(*b.tensors, backend="torch", item_log_q=torch.zeros(top, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# The sampler: its estimates ℓ and its mixed negatives
# ---------------------------------------------------------------------------------------------


def small_sampler(num_extra=0, seed=0, batch_size=8):
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(20, 30, generator=g) < 0.3
    keep[:, 0] = True  # every user has an item, every item a user
    keep[0, :] = True
    users, items = keep.nonzero(as_tuple=True)
    return InBatchSampler(users, items, 20, 30, batch_size=batch_size, num_pool=3, seed=seed, num_extra=num_extra)


def test_sampling_log_q_is_the_log_popularity_relative_to_uniform():
    s = small_sampler()
    item_q, user_q = s.sampling_log_q(dtype=torch.float64)
    deg = torch.bincount(s.items, minlength=30).double()
    torch.testing.assert_close(item_q, torch.log(deg / s.num_train * 30))
    # E_q[e^{−ℓ}] = 1: the corrected sum is on the scale of a uniform sample
    for table, size in ((item_q, 30), (user_q, 20)):
        q = torch.exp(table) / size
        assert float(q.sum()) == pytest.approx(1.0)
        assert float((q * torch.exp(-table)).sum()) == pytest.approx(1.0)


def test_sampling_log_q_mixes_in_the_uniform_draws():
    s = small_sampler(num_extra=12)
    item_q, _ = s.sampling_log_q(dtype=torch.float64)
    NP = 8 * 3
    deg = torch.bincount(s.items, minlength=30).double()
    q = (NP * deg / s.num_train + 12 / 30) / (NP + 12)
    torch.testing.assert_close(item_q, torch.log(30 * q))
    # all uniform: no correction at all
    assert torch.equal(s.sampling_log_q(num_extra=10**9, dtype=torch.float64)[0].abs() < 1e-6,
                       torch.ones(30, dtype=torch.bool))


def test_the_pool_items_follow_the_estimated_probabilities():
    # Proposition 1, measured: the frequency of each id among the pool columns of many batches
    s = small_sampler(batch_size=16)
    counts = torch.zeros(30, dtype=torch.float64)
    for epoch in range(40):
        for batch in s.epoch_batches(epoch):
            counts += torch.bincount(batch.pool_items.reshape(-1), minlength=30).double()
    freq = counts / counts.sum()
    want = torch.exp(s.sampling_log_q(dtype=torch.float64)[0]) / 30
    assert (freq - want).abs().max() < 0.01


def test_mixed_negatives_leave_the_pools_as_they_are_and_are_seeded():
    plain, mixed = small_sampler(), small_sampler(num_extra=5)
    for a, b in zip(plain.epoch_batches(1), mixed.epoch_batches(1)):
        assert all(torch.equal(x, y) for x, y in zip(a[:4], b[:4]))  # the pools are the same draws
        assert len(a) == 4 and b.extra_items.shape == (5,) and b.extra_users.shape == (5,)
        assert int(b.extra_items.max()) < 30 and int(b.extra_users.max()) < 20
    again = [b.extra_items for b in small_sampler(num_extra=5).epoch_batches(1)]
    assert all(torch.equal(x, b.extra_items) for x, b in zip(again, mixed.epoch_batches(1)))


def test_num_extra_is_checked():
    with pytest.raises(TypeError, match="num_extra: expected an int >= 0"):
        small_sampler(num_extra=-1)


def test_the_objective_passes_the_batch_mixed_negatives_to_the_loss():
    s = small_sampler(num_extra=4)
    torch.manual_seed(0)
    model = EmbeddingModel(20, 30, 8).double()
    item_q, user_q = s.sampling_log_q(dtype=torch.float64)
    objective = HDCCFObjective(model, s.interaction_index(), item_log_q=item_q, user_log_q=user_q, temperature=0.5)
    batch = next(iter(s.epoch_batches(0)))
    got = objective(batch)
    users, items, pool_items, pool_users, extra_items, extra_users = batch
    U, I = model.user_table, model.item_table
    want = debiased_contrastive_loss(
        U(users), I(items), I(pool_items), U(pool_users), users, items, pool_items, pool_users,
        interactions=s.interaction_index(), temperature=0.5, item_log_q=item_q, user_log_q=user_q,
        extra_negatives=ExtraNegatives(I(extra_items), U(extra_users), extra_items, extra_users))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    without = objective(batch[:4])
    assert not torch.allclose(got, without)


def test_large_mixed_negatives_are_in_the_score_range_check():
    # float32: finite extra item embeddings whose scores against the users would overflow
    b = make_batch(M=4, P=2, d=4, dtype=torch.float32)
    extra = extras()
    huge = ExtraNegatives(extra.item_emb.float() * 1e38, extra.user_emb.float(), extra.items, extra.users)
    with pytest.raises(ValueError, match="the scores may overflow"):
        debiased_contrastive_loss(*b.tensors, interactions=b.index, backend="torch", extra_negatives=huge)
