"""The sampling-bias correction (logQ) and the mixed negatives in the dot/cosine Triton kernels,
against the PyTorch reference (hdccf_triton/LOSS.md, "Sampling-bias correction" and "Mixed
negatives").

As ``test_triton_dot.py``: the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``
set per test by an autouse fixture), every output buffer NaN-poisoned
(``triton_helpers.Kernels``), on tiny float64 batches whose shapes are not multiples of the
interpreter's 16 × 16 tiles (M = 19 rows, P = 3, B′ = 5 or 20 extra columns). Each comparison
covers the per-row statistics (the four log-sums, with −inf where a family has no true negative,
and the counts n_item, n_user, n_item_aux, n_user_aux exactly), the per-row loss and the
gradients of all six embedding tensors (rows, pools, extras) under a random, non-uniform
upstream gradient, so that a correction dropped in any one kernel (forward, row pass, column
pass) or an extra column let into C or E fails. Tests marked ``gpu`` run the compiled kernels
on CUDA (``bench/gpu_check.sh``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import hdccf_triton.backends.reference as reference  # noqa: E402
import hdccf_triton.backends._triton_runtime as _triton_runtime  # noqa: E402
import hdccf_triton.backends.triton_dot as triton_dot  # noqa: E402
from hdccf_triton import InteractionIndex, debiased_contrastive_loss  # noqa: E402
from hdccf_triton.options import LossOptions  # noqa: E402
from hdccf_triton.terms import ExtraNegatives, LossInputs, prepare_scores  # noqa: E402
from triton_helpers import (  # noqa: E402
    Case,
    Kernels,
    all_false_negative_case,
    assert_error_within_factor,
    make_case,
    use_triton_mode,
)

DEBIASED = dict(omega_user=0.2, omega_item=0.3, lambda_user=0.7, lambda_item=1.3)
NAMES = ("user_emb", "item_emb", "pool_item_emb", "pool_user_emb", "extra item_emb", "extra user_emb")


@pytest.fixture(autouse=True)
def _triton_mode(request, monkeypatch):
    use_triton_mode(request, monkeypatch)


def _options(similarity="dot", debias=True, temperature=0.1, **kw):
    extra = DEBIASED if debias else dict(lambda_user=0.7, lambda_item=1.3)
    return LossOptions(similarity=similarity, debias=debias, temperature=temperature, **{**extra, **kw})


def _extras(case: Case, B: int, *, seed: int, scale: float, items=None, users=None):
    """B′ random mixed negatives [B′, d] (ids drawn from the case's index ranges unless given)."""
    g = torch.Generator().manual_seed(seed)
    d, dtype = case.embeddings[0].shape[1], case.embeddings[0].dtype
    emb = lambda: (torch.randn(B, d, generator=g, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    index = case.index
    items = torch.randint(0, index.num_items, (B,), generator=g) if items is None else items
    users = torch.randint(0, index.num_users, (B,), generator=g) if users is None else users
    return [emb(), emb()], (items, users)


def _log_q(index: InteractionIndex, *, seed: int, scale: float = 1.5, which=("item", "user")):
    """Non-uniform correction tables ℓ (N(0, scale²) per id), or None for a table not in ``which``."""
    g = torch.Generator().manual_seed(seed)
    item = torch.randn(index.num_items, generator=g, dtype=torch.float64) * scale
    user = torch.randn(index.num_users, generator=g, dtype=torch.float64) * scale
    return (item if "item" in which else None, user if "user" in which else None)


def _inputs(case: Case, embeddings, extra_ids, log_q) -> LossInputs:
    """LossInputs of the case with ``embeddings`` (4, or 6 with the extras') and the options."""
    extra = None if extra_ids is None else ExtraNegatives(embeddings[4], embeddings[5], *extra_ids)
    return LossInputs(*embeddings[:4], *case.ids, extra, log_q)


def _loss_and_grads(per_row_loss, case, extra_emb, extra_ids, log_q, options, upstream):
    """per_row_loss on fresh leaves; the gradients of Σ upstream·loss for every leaf (zeros if unused)."""
    leaves = [e.detach().clone().requires_grad_() for e in list(case.embeddings) + list(extra_emb)]
    loss = per_row_loss(_inputs(case, leaves, extra_ids, log_q), case.index, options, case.row_offset)
    grads = torch.autograd.grad((loss * upstream.to(loss.dtype)).sum(), leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def _compare(case: Case, options, *, B=5, log_q="random", extra_ids=None, extra_scale=0.7, seed=0,
             rtol=1e-10, **overrides):
    """The Triton kernels (``overrides``: launch choices) against the float64 reference: the
    statistics (exact counts, aux counts included), the per-row loss and all six gradients.

    ``B``: extra columns (0: none); ``log_q``: "random", "item" (item table only), None, or a
    tuple of tables. Returns the kernels' statistics."""
    kern = Kernels(triton_dot, **overrides)
    extra_emb, ids = _extras(case, B, seed=seed + 7, scale=extra_scale) if B else ([], None)
    if extra_ids is not None:
        ids = extra_ids
    if log_q == "random":
        log_q = _log_q(case.index, seed=seed + 3)
    elif log_q == "item":
        log_q = _log_q(case.index, seed=seed + 3, which=("item",))
    g = torch.Generator().manual_seed(seed)
    upstream = torch.rand(case.M, generator=g, dtype=torch.float64) * 2 - 0.5  # non-uniform, some < 0

    with torch.no_grad():
        embeddings = list(case.embeddings) + list(extra_emb)
        rest = (case.index, options, case.row_offset)
        got_scores, got = kern.fused_scores(_inputs(case, embeddings, ids, log_q), *rest)
        want_scores = prepare_scores(_inputs(case, embeddings, ids, log_q), options, case.row_offset)
        prepared = _inputs(case, embeddings, ids, log_q).with_embeddings(*want_scores[:4], extra=want_scores.extra)
        want = reference.negative_statistics(prepared, *rest)  # normalised for cosine
    assert (got_scores.extra is None) == (want_scores.extra is None)
    if B:
        assert got_scores.extra.items.shape[0] == B  # what combine_terms reads for B′
    for name in ("s", "own_A", "own_B", "own_C", "own_E"):  # never corrected
        torch.testing.assert_close(getattr(got_scores, name), getattr(want_scores, name), rtol=rtol, atol=rtol,
                                   msg=name)
    for name in ("n_item", "n_user", "n_item_aux", "n_user_aux"):
        a, b = getattr(got, name), getattr(want, name)
        if B == 0 and name.endswith("_aux"):
            assert a is None and b is None, name
        else:
            assert a.dtype == torch.int64 and torch.equal(a, b), f"{name}: {a.tolist()} != {b.tolist()}"
    for name in ("lse_A", "lse_B", "lse_C", "lse_E"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == torch.float64
        assert torch.equal(torch.isneginf(a), torch.isneginf(b)), name
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol, msg=name)

    loss, grads = _loss_and_grads(kern.per_row_loss, case, extra_emb, ids, log_q, options, upstream)
    loss_ref, grads_ref = _loss_and_grads(reference.per_row_loss, case, extra_emb, ids, log_q, options, upstream)
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=rtol)
    for name, a, b in zip(NAMES, grads, grads_ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=f"d {name}")
    return got


# ---------------------------------------------------------------------------------------------
# float64 against the float64 reference
# ---------------------------------------------------------------------------------------------

_MODES = {"logq": (0, "random"), "extra": (5, None), "both": (5, "random")}


@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("mode", list(_MODES))
def test_options_match_float64_reference(mode, similarity, debias):
    B, log_q = _MODES[mode]
    case = make_case(19, 3, 8, seed=11, scale=0.8)
    stats = _compare(case, _options(similarity, debias), B=B, log_q=log_q, seed=len(mode))
    if B:  # the user–item counts include the extra columns, the auxiliary ones do not
        assert (stats.n_item > stats.n_item_aux).any() and (stats.n_user > stats.n_user_aux).any()


def test_one_correction_table_and_the_sorted_index():
    # an item table only (ℓᵁ = 0), D searched as sorted keys, 24-dim embeddings, both options
    case = make_case(19, 3, 24, seed=4, scale=0.5, num_users=11, num_items=13)
    _compare(case, _options("cosine"), B=5, log_q="item", seed=2, index_mode=2)


def test_large_scores():
    # |scores| and |ℓ| in the hundreds: exp overflows even float64 without the max shift, and
    # the correction moves which columns dominate each sum
    case = make_case(19, 3, 24, seed=5, scale=2.2, num_users=11, num_items=13)
    U, _, X, _ = case.embeddings
    assert (U @ X.reshape(-1, 24).T / 0.05).abs().max() > 500
    g = torch.Generator().manual_seed(8)
    log_q = (torch.randn(13, generator=g, dtype=torch.float64) * 150,
             torch.randn(11, generator=g, dtype=torch.float64) * 150)
    _compare(case, _options("dot", temperature=0.05), B=5, log_q=log_q, extra_scale=2.2, seed=1, rtol=1e-9)


@pytest.mark.parametrize("overrides", [
    dict(col_splits=8, row_splits=2),  # 4 pool splits of 16 columns, then 2 extra splits (B′ = 20)
    dict(col_splits=3, row_splits=3, block_n=32),  # 2 pool splits of 32 columns, 1 extra split
], ids=["16-column-splits", "32-column-splits"])
def test_forced_splits_do_not_straddle_the_pool(overrides):
    # n_pool = 57 is not a multiple of the splits' widths: the last pool split is short, and
    # the extra columns start a split of their own (their counts are not the auxiliary ones)
    case = make_case(19, 3, 8, seed=6, scale=0.7)
    n_pool, B = 57, 20
    block_n = overrides.get("block_n", 16)
    per, pool_splits, splits = _triton_runtime.column_splits(n_pool, B, overrides["col_splits"], block_n)
    assert pool_splits * per >= n_pool > (pool_splits - 1) * per and splits > pool_splits
    _compare(case, _options("dot"), B=B, seed=3, **overrides)
    _compare(case, _options("cosine", debias=False), B=B, log_q=None, seed=4, **overrides)


def test_column_splits():
    assert _triton_runtime.column_splits(57, 0, 3, 16) == (32, 2, 2)  # as split_size: no extra split
    assert _triton_runtime.column_splits(57, 20, 8, 16) == (16, 4, 6)
    assert _triton_runtime.column_splits(57, 5, 1, 16) == (64, 1, 2)  # one split each


def test_own_blocks_offset_with_extras():
    # N = 25 pool blocks, the rows' own blocks start at block 3 (as under gather_across_ranks):
    # the column pass's own-block terms must never reach an extra column
    case = make_case(19, 3, 8, N=25, row_offset=3, seed=9, scale=0.7)
    _compare(case, _options("dot"), B=5, seed=5, row_splits=2)


@pytest.mark.parametrize("debias", [True, False])
def test_single_row_has_only_extra_negatives(debias):
    # M = N = 1: the pool is the row's own block (Q_aux = 0, C and E empty), the B′ extra
    # columns are the only negatives of A and B
    case = make_case(1, 2, 8, seed=17, scale=0.8)
    got = _compare(case, _options("cosine", debias), B=5, seed=8)
    assert got.n_item_aux.tolist() == [0] and got.n_user_aux.tolist() == [0]
    assert torch.isneginf(got.lse_C).all() and torch.isneginf(got.lse_E).all()


def test_rows_whose_negatives_are_all_false():
    # row 0 (user 0, item 0): every pool and extra column is a false negative (user 0 saw
    # every item, every user saw item 0); row 1 has no true negative item at all
    case = all_false_negative_case(P=2, d=8)
    extra_ids = (torch.tensor([1, 2, 7, 5, 3]), torch.tensor([1, 2, 3, 4, 5]))
    got = _compare(case, _options(), B=5, extra_ids=extra_ids, seed=6)
    assert got.n_item[0] == 0 and got.n_user[0] == 0 and got.n_item[1] == 0 and got.n_item_aux[1] == 0
    assert all(torch.isneginf(getattr(got, f"lse_{x}")[0]) for x in "ABCE")
    assert torch.isneginf(got.lse_A[1]) and torch.isneginf(got.lse_E[1])


def _pool_false_extras_true_case() -> Case:
    """Row 0 = (user 0, item 0): user 0 saw items 0..7 and every user 0..4 saw item 0, while the
    pools draw items from 1..7 and users from 1..4: no true negative in the pool. Items 8, 9
    and user 5 are never observed with row 0: as extra columns they are its only true negatives."""
    num_users, num_items, M, P, d = 6, 10, 5, 2, 8
    g = torch.Generator().manual_seed(12)
    users, items = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 3, 4, 5, 6])
    pool_items = torch.randint(1, 8, (M, P), generator=g)
    pool_users = torch.randint(1, 5, (M, P), generator=g)
    pairs = {(0, i) for i in range(8)} | {(u, 0) for u in range(5)} | set(zip(users.tolist(), items.tolist()))
    pu, pi = zip(*sorted(pairs))
    index = InteractionIndex.from_pairs(pu, pi, num_users, num_items)
    emb = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.7  # noqa: E731
    return Case([emb(M, d), emb(M, d), emb(M, P, d), emb(M, P, d)], [users, items, pool_items, pool_users], index)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_true_negatives_only_among_the_extras(similarity):
    # row 0: A and B have true negatives (extra columns), C and E none (−inf, aux counts 0)
    case = _pool_false_extras_true_case()
    extra_ids = (torch.tensor([8, 9, 2, 8, 1]), torch.tensor([5, 1, 5, 2, 3]))
    got = _compare(case, _options(similarity), B=5, extra_ids=extra_ids, seed=7)
    assert got.n_item[0] == 3 and got.n_user[0] == 2 and got.n_item_aux[0] == 0 and got.n_user_aux[0] == 0
    assert torch.isfinite(got.lse_A[0]) and torch.isfinite(got.lse_B[0])
    assert torch.isneginf(got.lse_C[0]) and torch.isneginf(got.lse_E[0])


@pytest.mark.parametrize("B", [0, 5])
def test_zero_tables_are_no_correction(B):
    # ℓ = 0 everywhere: s₂ = t·f − 0 rounds as t·f, and max over s₂ is max(t)·f (f > 0): the
    # corrected kernels give the plain loss and gradients to the bit
    case = make_case(19, 3, 8, seed=13, scale=0.8)
    extra_emb, ids = _extras(case, B, seed=1, scale=0.8) if B else ([], None)
    zeros = tuple(torch.zeros(n, dtype=torch.float64) for n in (case.index.num_items, case.index.num_users))
    upstream = torch.rand(case.M, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kern = Kernels(triton_dot)
    for options in (_options("dot"), _options("cosine", debias=False)):
        plain, plain_grads = _loss_and_grads(kern.per_row_loss, case, extra_emb, ids, None, options, upstream)
        zero, zero_grads = _loss_and_grads(kern.per_row_loss, case, extra_emb, ids, zeros, options, upstream)
        assert torch.equal(plain, zero)
        for name, a, b in zip(NAMES, plain_grads, zero_grads):
            assert torch.equal(a, b), name


def test_public_api_backend_triton():
    # debiased_contrastive_loss with both options: validation, the kernels, the extras' gradients
    case = make_case(19, 3, 8, seed=14, scale=0.8)
    extra_emb, (items, users) = _extras(case, 5, seed=2, scale=0.8)
    item_log_q, user_log_q = _log_q(case.index, seed=5)
    w = torch.rand(case.M, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    results = []
    for backend in ("torch", "triton"):
        leaves = [e.detach().clone().requires_grad_() for e in list(case.embeddings) + extra_emb]
        loss = debiased_contrastive_loss(
            *leaves[:4], *case.ids, interactions=case.index, similarity="cosine", reduction="none",
            backend=backend, extra_negatives=ExtraNegatives(leaves[4], leaves[5], items, users),
            item_log_q=item_log_q, user_log_q=user_log_q, **DEBIASED)
        results.append((loss.detach(), torch.autograd.grad((loss * w).sum(), leaves)))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(NAMES, got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_float32_error_is_that_of_the_float32_reference():
    # scores of a few hundred and corrections of tens, in fp32 (exp overflows beyond 88)
    case = make_case(19, 3, 24, seed=15, scale=1.6)
    extra_emb, ids = _extras(case, 5, seed=4, scale=1.6)
    log_q = tuple(t * 20 for t in _log_q(case.index, seed=6))
    options = _options("dot")
    upstream = torch.rand(case.M, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    truth, truth_grads = _loss_and_grads(reference.per_row_loss, case, extra_emb, ids, log_q, options, upstream)
    low, low_extra = case.cast(torch.float32), [e.float() for e in extra_emb]
    ref32, ref32_grads = _loss_and_grads(reference.per_row_loss, low, low_extra, ids, log_q, options, upstream)
    got, got_grads = _loss_and_grads(Kernels(triton_dot).per_row_loss, low, low_extra, ids, log_q, options, upstream)
    assert got.dtype == torch.float32 and all(g.dtype == torch.float32 for g in got_grads)
    eps = torch.finfo(torch.float32).eps
    assert_error_within_factor(got, ref32, truth, atol=4 * eps * float(truth.abs().max()), what="loss")
    for name, a, r, t in zip(NAMES, got_grads, ref32_grads, truth_grads):
        assert_error_within_factor(a, r, t, atol=8 * eps * max(1.0, float(t.abs().max())), what=f"d {name}")


# ---------------------------------------------------------------------------------------------
# The compiled kernels (CUDA; skipped without a GPU)
# ---------------------------------------------------------------------------------------------


def _to(case: Case, device, dtype) -> Case:
    return Case([e.to(device, dtype) for e in case.embeddings], [t.to(device) for t in case.ids],
                case.index.to(device), case.row_offset)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,similarity", [(torch.float64, "dot"), (torch.float32, "cosine"),
                                              (torch.bfloat16, "dot")])
def test_gpu_options_match_reference(dtype, similarity):
    # the compiled kernels with both options under the GPU launch configuration (forward
    # splits: pool, then extra), against the float64 reference; fp32 within a factor of the
    # fp32 reference's error, bf16 within its resolution
    case = make_case(300, 4, 64, seed=16, scale=0.3, num_users=50, num_items=60)
    extra_emb, ids = _extras(case, 200, seed=5, scale=0.3)
    log_q = _log_q(case.index, seed=7)
    options = _options(similarity)
    upstream = torch.rand(case.M, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    truth, truth_grads = _loss_and_grads(reference.per_row_loss, case, extra_emb, ids, log_q, options, upstream)
    cuda = lambda ts: tuple(t.cuda() for t in ts)  # noqa: E731
    got, got_grads = _loss_and_grads(Kernels(triton_dot).per_row_loss, _to(case, "cuda", dtype),
                                     [e.to("cuda", dtype) for e in extra_emb], cuda(ids), cuda(log_q), options,
                                     upstream.cuda())
    got, got_grads = got.cpu().double(), [g.cpu().double() for g in got_grads]
    if dtype == torch.float64:
        torch.testing.assert_close(got, truth, rtol=1e-10, atol=1e-10)
        for name, a, t in zip(NAMES, got_grads, truth_grads):
            torch.testing.assert_close(a, t, rtol=1e-9, atol=1e-9 * max(1.0, float(t.abs().max())), msg=name)
        return
    low = case.cast(dtype)
    low_extra = [e.to(dtype) for e in extra_emb]
    ref_low, ref_low_grads = _loss_and_grads(reference.per_row_loss, low, low_extra, ids, log_q, options, upstream)
    eps = torch.finfo(torch.float32).eps
    assert_error_within_factor(got, ref_low, truth, atol=16 * eps * float(truth.abs().max()), what="loss")
    for name, a, r, t in zip(NAMES, got_grads, ref_low_grads, truth_grads):
        if dtype == torch.float32:
            assert_error_within_factor(a, r, t, atol=16 * eps * float(t.abs().max()), what=f"d {name}")
        else:
            torch.testing.assert_close(a, t, rtol=0, atol=16 * 2.0**-8 * float(t.abs().max()), msg=name)
