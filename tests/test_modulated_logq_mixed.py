"""The sampling-bias correction (logQ) and the mixed negatives with the modulated similarity:
the reference against the literal Decimal oracle, and the fused Triton kernels against the
float64 reference (hdccf_triton/LOSS.md, "Sampling-bias correction" and "Mixed negatives").

The kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set per test by an autouse
fixture, as in ``test_modulated_triton.py``), every output buffer NaN-poisoned first. Compared:
the statistics (the four lse, n_item, n_user and the pool-only n_item_aux, n_user_aux), the
per-row loss and the gradients of the four embedding tensors, of both extras' embeddings and of
g's weight and bias, under a non-uniform upstream gradient. Shapes are tiny and not multiples
of the 16-wide tiles (M = 7, P = 3, B′ = 5, dim = 5: 21 pool columns and 5 extra ones), and
forced column splits cut the 26 columns at 16 and at N·P = 21, so that a split ends inside a
tile, the extra columns get splits of their own, and the column-parallel backward has a tile
that straddles N·P.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import hdccf_triton.backends.reference as reference  # noqa: E402
import hdccf_triton.backends._triton_runtime as _triton_runtime  # noqa: E402
import hdccf_triton.backends.triton_modulated as triton_modulated  # noqa: E402
from hdccf_triton import LossOptions, ModulatedSimilarity, debiased_contrastive_loss  # noqa: E402
from hdccf_triton.terms import ExtraNegatives, LossInputs, prepare_scores  # noqa: E402
from naive_modulated import naive_modulated_row_losses  # noqa: E402
from triton_helpers import Kernels, all_false_negative_case, make_case, use_triton_mode  # noqa: E402

DEBIASED = dict(omega_user=0.2, omega_item=0.3, lambda_user=0.7, lambda_item=1.3)
MODES = ("logq", "extra", "both")


@pytest.fixture(autouse=True)
def _triton_mode(request, monkeypatch):
    use_triton_mode(request, monkeypatch)


def _similarity(dim, normalize, *, seed=0):
    """g with entries ~U(−2, 2) and a N(0, 1) bias: m far from constant (float64)."""
    torch.manual_seed(seed)
    sim = ModulatedSimilarity(dim, normalize).double()
    with torch.no_grad():
        sim.g.weight.mul_(2 * math.sqrt(3 * dim))
        sim.g.bias.normal_()
    return sim


def _options(sim, debias=True, temperature=0.1, **kw):
    return LossOptions(similarity=sim, debias=debias, temperature=temperature, **{**(DEBIASED if debias else {}), **kw})


def _extras(B, d, num_users, num_items, *, seed, scale=0.8, items=None, users=None):
    """B′ mixed negatives: embeddings ``[B′, d]`` N(0, scale²) (items laid out ``[q ‖ e]``,
    users ``[p ‖ e]`` like the pools), ids from the case's small ranges (false negatives occur)."""
    g = torch.Generator().manual_seed(seed)
    item_emb = torch.randn(B, d, generator=g, dtype=torch.float64) * scale
    user_emb = torch.randn(B, d, generator=g, dtype=torch.float64) * scale
    items = torch.randint(0, num_items, (B,), generator=g) if items is None else items
    users = torch.randint(0, num_users, (B,), generator=g) if users is None else users
    return ExtraNegatives(item_emb, user_emb, items, users)


def _tables(num_users, num_items, *, seed, scale=1.5):
    """ℓ tables ``[num_items]``, ``[num_users]``: N(0, scale²), so the correction matters."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_items, generator=g, dtype=torch.float64) * scale,
            torch.randn(num_users, generator=g, dtype=torch.float64) * scale)


def _extra_and_log_q(case, mode, *, B=5, seed=0, tables=None):
    """(extra, log_q) of a case for a mode of MODES."""
    nu, ni = case.index.num_users, case.index.num_items
    d = case.embeddings[0].shape[1]
    extra = _extras(B, d, nu, ni, seed=seed + 1) if mode in ("extra", "both") else None
    log_q = (tables or _tables(nu, ni, seed=seed + 2)) if mode in ("logq", "both") else None
    return extra, log_q


def _inputs(case, extra, log_q, embeddings=None, extra_embeddings=None) -> LossInputs:
    if extra is not None and extra_embeddings is not None:
        extra = extra.with_embeddings(*extra_embeddings)
    return LossInputs(*(case.embeddings if embeddings is None else embeddings), *case.ids, extra, log_q)


_GRAD_NAMES = ("user_emb", "item_emb", "pool_item_emb", "pool_user_emb", "extra.item_emb", "extra.user_emb",
               "g.weight", "g.bias")


def _loss_and_grads(backend, case, options, upstream, index, extra, log_q):
    """per_row_loss and the gradients of Σ upstream·loss to the embeddings, the extras' embeddings
    (zeros without extras), W and b."""
    leaves = [e.detach().clone().requires_grad_() for e in case.embeddings]
    extra_leaves = [] if extra is None else [t.detach().clone().requires_grad_() for t in extra[:2]]
    inputs = _inputs(case, extra, log_q, leaves, extra_leaves)
    loss = backend.per_row_loss(inputs, index, options, case.row_offset)
    params = list(options.similarity.parameters())
    wrt = leaves + extra_leaves + params
    grads = torch.autograd.grad(loss, wrt, upstream.to(loss.dtype), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, grads)]
    if extra is None:
        grads = grads[:4] + [torch.zeros(0), torch.zeros(0)] + grads[4:]
    return loss.detach(), grads


def _compare(case, options, extra, log_q, index_mode, *, seed=0, rtol=1e-10, **overrides):
    """The kernels against the float64 reference: statistics, loss and every gradient. Returns
    the kernels' (statistics, loss, gradients)."""
    index = None if index_mode is None else case.index
    kern = Kernels(triton_modulated, index_mode=index_mode, **overrides)
    g = torch.Generator().manual_seed(seed)
    upstream = torch.rand(case.M, generator=g, dtype=torch.float64) * 2 - 0.5

    args = (_inputs(case, extra, log_q), index, options, case.row_offset)
    with torch.no_grad():
        got = kern.negative_statistics(*args)
        want = reference.negative_statistics(*args)
    for name in ("n_item", "n_user", "n_item_aux", "n_user_aux"):
        a, b = getattr(got, name), getattr(want, name)
        if name.endswith("_aux"):  # None without extras, as the reference's
            assert (a is None) == (b is None) == (extra is None), name
        assert a is None or (a.dtype == torch.int64 and torch.equal(a, b)), name
    for name in ("lse_A", "lse_B", "lse_C", "lse_E"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == torch.float64
        assert torch.equal(torch.isneginf(a), torch.isneginf(b)), name
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol, msg=name)

    loss, grads = _loss_and_grads(kern, case, options, upstream, index, extra, log_q)
    loss_ref, grads_ref = _loss_and_grads(reference, case, options, upstream, index, extra, log_q)
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=rtol)
    for name, a, b in zip(_GRAD_NAMES, grads, grads_ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=f"d{name}")
    return got, loss, grads


# ---------------------------------------------------------------------------------------------
# The reference against the literal oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True], ids=["dot", "cosine"])
@pytest.mark.parametrize("debias", [True, False], ids=["debiased", "biased"])
@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_literal_oracle(mode, debias, normalize):
    case = make_case(5, 2, 6, seed=3, scale=0.8)
    sim = _similarity(3, normalize, seed=1)
    extra, log_q = _extra_and_log_q(case, mode, B=4, seed=4)
    pairs = [(int(k) // case.index.num_items, int(k) % case.index.num_items) for k in case.index.keys.tolist()]
    kw = dict(temperature=0.2, **(DEBIASED if debias else dict(lambda_user=0.5, lambda_item=2.0)))
    public = dict(extra_negatives=extra, item_log_q=None if log_q is None else log_q[0],
                  user_log_q=None if log_q is None else log_q[1])
    got = debiased_contrastive_loss(*case.embeddings, *case.ids, interactions=case.index, similarity=sim,
                                    reduction="none", backend="torch", debias=debias, **kw, **public)
    want = naive_modulated_row_losses(*case.embeddings, *case.ids, sim.g.weight, sim.g.bias, pairs=pairs,
                                      normalize=normalize, debias=debias, **kw, **public)
    torch.testing.assert_close(got, torch.tensor([float(w) for w in want], dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    # the option changes the loss: the oracle is not compared on a no-op
    plain = debiased_contrastive_loss(*case.embeddings, *case.ids, interactions=case.index, similarity=sim,
                                      reduction="none", backend="torch", debias=debias, **kw)
    assert (got - plain).abs().max() > 1e-3
    if extra is not None and debias:  # some extra column is a false negative of some row
        masks = reference.true_negative_masks(case.ids, case.index, True, 0, extra=extra)
        assert not masks[0][:, 10:].all() or not masks[1][:, 10:].all()


# ---------------------------------------------------------------------------------------------
# The kernels against the float64 reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True], ids=["dot", "cosine"])
@pytest.mark.parametrize("debias", [True, False], ids=["debiased", "biased"])
@pytest.mark.parametrize("mode", MODES)
def test_kernels_match_reference(mode, debias, normalize):
    # M = 7, P = 3, B′ = 5, dim = 5; col_splits = 2 with 16-wide tiles: the pool splits
    # [0, 16), [16, 21) and the extra split [21, 26); row_splits = 2 for the column backward
    case = make_case(7, 3, 10, seed=11 + normalize, scale=0.8)
    sim = _similarity(5, normalize, seed=2 + debias)
    extra, log_q = _extra_and_log_q(case, mode, seed=5)
    index_mode = (1, 2)[normalize] if debias else None
    stats, _, grads = _compare(case, _options(sim, debias), extra, log_q, index_mode, seed=1, col_splits=2,
                               row_splits=2)
    if extra is not None:  # the extras' gradients were compared, not two zeros
        assert grads[4].abs().max() > 1e-3 and grads[5].abs().max() > 1e-3
    if extra is not None and debias:  # the aux counts differ from the full ones: their merge is tested
        assert (stats.n_item_aux != stats.n_item).any() and (stats.n_user_aux != stats.n_user).any()
        assert (stats.n_item - stats.n_item_aux < 5).any()  # and an extra column is a false negative


@pytest.mark.parametrize("col_splits,row_splits", [(1, 1), (3, 3), (8, 1)])
def test_split_layouts(col_splits, row_splits):
    # the pool of N = 9 blocks (row_offset 1) has 27 columns, the extras 5: with 1 split the
    # pools and the extras get one split each; with 3, splits of 16 columns: [0, 16), [16, 27),
    # [27, 32); 8 asks for more splits than tiles
    case = make_case(7, 3, 10, N=9, row_offset=1, seed=21, scale=0.8)
    extra, log_q = _extra_and_log_q(case, "both", seed=6)
    log_q = (None, log_q[1])  # one table: the item columns uncorrected
    per, pool_splits, splits = _triton_runtime.column_splits(27, 5, col_splits, 16)
    assert per % 16 == 0 and pool_splits == -(-27 // per) and splits == pool_splits + -(-5 // per)
    _compare(case, _options(_similarity(5, True, seed=4)), extra, log_q, 1, seed=2,
             col_splits=col_splits, row_splits=row_splits)


def test_merged_column_splits_count_the_pool_apart():
    lse = torch.tensor([[[0.0]], [[1.0]], [[float("-inf")]]])
    cnt = torch.tensor([[[1]], [[2]], [[4]]], dtype=torch.int32)
    merged, counts, aux = _triton_runtime.merge_column_splits(lse, cnt, 2)
    assert counts.tolist() == [[7]] and aux.tolist() == [[3]]
    torch.testing.assert_close(merged, torch.tensor([[math.log(1 + math.e)]]))
    assert _triton_runtime.merge_column_splits(lse, cnt, 3)[2] is None  # no extra split


def test_huge_scores_and_corrections():
    # scores beyond ±750 (exp overflows float64 without the max shift) and ℓ of ±60
    case = make_case(7, 3, 10, seed=5, scale=2.5)
    sim = _similarity(5, False, seed=3)
    options = _options(sim, temperature=0.01)
    tables = _tables(case.index.num_users, case.index.num_items, seed=8, scale=40.0)
    extra, log_q = _extra_and_log_q(case, "both", seed=7, tables=tables)
    # extras that outscore pool columns (their p, q halves 1.5 times those of five pool
    # columns), so that they carry weight beside the huge pool scores
    X, Y = (t.reshape(-1, 10) for t in case.embeddings[2:])
    stretch = torch.tensor([1.5] * 5 + [1.0] * 5, dtype=torch.float64)
    picked = torch.tensor([0, 4, 8, 12, 16])
    extra = extra.with_embeddings(X[picked] * stretch, Y[picked] * stretch)
    with torch.no_grad():
        scores = prepare_scores(_inputs(case, extra, log_q), options)
    assert scores.own_A.abs().max() > 750 and max(t.abs().max() for t in tables) > 60
    _, _, grads = _compare(case, options, extra, log_q, 1, rtol=1e-9, col_splits=2)
    assert grads[4].abs().max() > 1.0


@pytest.mark.parametrize("normalize", [False, True], ids=["dot", "cosine"])
def test_rows_without_true_negatives(normalize):
    # user 0 saw every item and every user saw item 0: for row 0 every pool and extra column
    # is a false negative; user 1 saw every item: row 1 has no true negative item, extras included
    case = all_false_negative_case(P=2, d=10)
    extra = _extras(3, 10, 6, 8, seed=9, items=torch.tensor([1, 5, 7]), users=torch.tensor([2, 3, 5]))
    log_q = _tables(6, 8, seed=10)
    options = _options(_similarity(5, normalize, seed=4))
    stats, _, grads = _compare(case, options, extra, log_q, 1, col_splits=2)
    assert stats.n_item[0] == 0 and stats.n_user[0] == 0 and stats.n_item[1] == 0
    assert stats.n_item_aux[1] == 0 and stats.n_user[1] > stats.n_user_aux[1]
    assert torch.isneginf(stats.lse_A[0]) and torch.isneginf(stats.lse_B[0]) and torch.isneginf(stats.lse_C[0])
    assert torch.isneginf(stats.lse_E[1]) and torch.isfinite(stats.lse_B[1])
    assert all(torch.isfinite(g).all() for g in grads)


def test_zero_tables_equal_no_correction():
    case = make_case(7, 3, 10, seed=12, scale=0.8)
    options = _options(_similarity(5, True, seed=5))
    kern = Kernels(triton_modulated, index_mode=1, col_splits=2)
    extra, _ = _extra_and_log_q(case, "extra", seed=11)
    zeros = (torch.zeros(case.index.num_items, dtype=torch.float64),
             torch.zeros(case.index.num_users, dtype=torch.float64))
    upstream = torch.linspace(-0.5, 1.5, case.M, dtype=torch.float64)
    with_zeros = _loss_and_grads(kern, case, options, upstream, case.index, extra, zeros)
    without = _loss_and_grads(kern, case, options, upstream, case.index, extra, None)
    assert torch.equal(with_zeros[0], without[0])
    assert all(torch.equal(a, b) for a, b in zip(with_zeros[1], without[1]))
    # and a non-zero table does change it (the comparison above is not of two no-ops)
    tables = _tables(case.index.num_users, case.index.num_items, seed=12)
    assert not torch.equal(_loss_and_grads(kern, case, options, upstream, case.index, extra, tables)[0], without[0])


def test_public_api_and_determinism():
    case = make_case(7, 3, 10, seed=13, scale=0.8)
    sim = _similarity(5, False, seed=6)
    extra, log_q = _extra_and_log_q(case, "both", seed=12)
    kw = dict(similarity=sim, temperature=0.1, reduction="none", extra_negatives=extra,
              item_log_q=log_q[0], user_log_q=log_q[1], **DEBIASED)
    via_api = debiased_contrastive_loss(*case.embeddings, *case.ids, interactions=case.index, backend="triton", **kw)
    want = debiased_contrastive_loss(*case.embeddings, *case.ids, interactions=case.index, backend="torch", **kw)
    torch.testing.assert_close(via_api, want, rtol=1e-10, atol=1e-10)
    kern = Kernels(triton_modulated, col_splits=2, row_splits=2)
    upstream = torch.linspace(0.1, 1.9, case.M, dtype=torch.float64)
    first = _loss_and_grads(kern, case, _options(sim), upstream, case.index, extra, log_q)
    second = _loss_and_grads(kern, case, _options(sim), upstream, case.index, extra, log_q)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
