"""The modulated-similarity kernels against the float64 PyTorch reference.

Without a GPU they run in Triton's CPU interpreter: an autouse fixture sets
``TRITON_INTERPRET=1`` per test (as ``test_triton_dot.py`` does) and the backend reloads
the kernel modules for the current setting, so this module runs in one pytest process with
any other, in any order. Every output buffer is NaN-filled first (``LaunchOverrides(poison_outputs=True)``), so an
unwritten tile fails the comparison. Compared: the statistics (lse and counts), the per-row
loss and the gradients of all four embedding tensors and of g's weight and bias, under a
non-uniform upstream gradient.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("triton")

import hdccf_triton.backends.reference as reference  # noqa: E402
import hdccf_triton.backends.triton_dot as triton_dot  # noqa: E402
import hdccf_triton.backends.triton_modulated as triton_modulated  # noqa: E402
from hdccf_triton.terms import prepare_scores  # noqa: E402
from hdccf_triton import (  # noqa: E402
    DebiasedContrastiveLoss,
    LossOptions,
    ModulatedSimilarity,
    debiased_contrastive_loss,
)
from hdccf_triton.loss import select_backend  # noqa: E402
from hdccf_triton.backends._triton_runtime import LaunchOverrides  # noqa: E402
from triton_helpers import (  # noqa: E402
    all_false_negative_case,
    assert_error_within_factor,
    make_case,
    Kernels,
    inputs_of,
    use_triton_mode,
)

DEBIASED = dict(omega_user=0.2, omega_item=0.3, lambda_user=0.7, lambda_item=1.3)


@pytest.fixture(autouse=True)
def _triton_mode(request, monkeypatch):
    use_triton_mode(request, monkeypatch)


#: the modulated kernels with every output buffer NaN-poisoned
tm = Kernels(triton_modulated)


def _similarity(dim, normalize, *, seed=0, dtype=torch.float64, device="cpu"):
    """g with entries ~U(−2, 2) and a N(0, 1) bias: m far from constant."""
    torch.manual_seed(seed)
    sim = ModulatedSimilarity(dim, normalize).to(dtype)
    with torch.no_grad():
        sim.g.weight.mul_(2 * math.sqrt(3 * dim))
        sim.g.bias.normal_()
    return sim.to(device)


def _options(sim, debias=True, temperature=0.1, **kw):
    extra = DEBIASED if debias else {}
    return LossOptions(similarity=sim, debias=debias, temperature=temperature, **{**extra, **kw})


def _loss_and_grads(backend, case, options, upstream, index):
    """per_row_loss and the gradients of Σ upstream·loss to the embeddings, W and b."""
    sim = options.similarity
    leaves = [e.detach().clone().requires_grad_() for e in case.embeddings]
    loss = backend.per_row_loss(inputs_of(case, leaves), index, options, case.row_offset)
    params = list(sim.parameters())
    grads = torch.autograd.grad(loss, leaves + params, upstream.to(loss.dtype), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves + params, grads)]
    return loss.detach(), grads


_GRAD_NAMES = ("user_emb", "item_emb", "pool_item_emb", "pool_user_emb", "g.weight", "g.bias")


def _compare_float64(case, options, index_mode, *, seed=0, rtol=1e-10, **overrides):
    index = None if index_mode is None else case.index
    kern = Kernels(triton_modulated, index_mode=index_mode, **overrides)
    g = torch.Generator().manual_seed(seed)
    upstream = torch.rand(case.M, generator=g, dtype=torch.float64) * 2 - 0.5

    args = (inputs_of(case), index, options, case.row_offset)
    with torch.no_grad():
        got = kern.negative_statistics(*args)
        want = reference.negative_statistics(*args)
    assert torch.equal(got.n_item, want.n_item) and torch.equal(got.n_user, want.n_user)
    for name in ("lse_A", "lse_B", "lse_C", "lse_E"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == torch.float64
        assert torch.equal(torch.isneginf(a), torch.isneginf(b)), name
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol, msg=name)

    loss, grads = _loss_and_grads(kern, case, options, upstream, index)
    loss_ref, grads_ref = _loss_and_grads(reference, case, options, upstream, index)
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=rtol)
    for name, a, b in zip(_GRAD_NAMES, grads, grads_ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=f"d{name}")
    return grads


# ---------------------------------------------------------------------------------------------
# float64 against the float64 reference
# ---------------------------------------------------------------------------------------------

_SMALL = [
    (M, P, dim, normalize, (M + P + dim) % 3)
    for M in (1, 2) for P in (1, 3) for dim in (8, 24) for normalize in (False, True)
]


@pytest.mark.parametrize("M,P,dim,normalize,variant", _SMALL)
def test_tiny_batches_match_float64_reference(M, P, dim, normalize, variant):
    # variant: 0 debiased with the bitmap index, 1 debiased with sorted keys, 2 biased
    case = make_case(M, P, 2 * dim, seed=M * 100 + P * 10 + dim, scale=0.8)
    sim = _similarity(dim, normalize, seed=variant)
    _compare_float64(case, _options(sim, debias=variant != 2), (1, 2, None)[variant])


_MEDIUM = {
    # name: (M, P, dim, normalize, debias, index_mode, extra make_case args, launch overrides)
    "dot-bitmap": (13, 3, 8, False, True, 1, {}, {}),
    "cosine-sorted": (13, 3, 24, True, True, 2, {}, {}),
    "biased-no-index": (13, 1, 24, False, False, None, {}, {}),
    "row-offset-splits": (18, 2, 8, True, True, 1, {"N": 24, "row_offset": 4},
                          {"col_splits": 2, "row_splits": 2}),
    # d = 12 and 20: the products with W₃ step over d in chunks of CHUNK = 8 (a partial last one)
    "dim-12-partial-chunk": (13, 2, 12, False, True, 1, {}, {}),
    "dim-20-partial-chunk-cosine": (11, 3, 20, True, True, 2, {}, {}),
    # smaller pair tiles: the GPU's 16 × 8 from BLOCK_D = 128 on (triton_modulated._GPU_PAIR_TILES), 8 × 8
    "tiles-16x8": (21, 2, 12, True, True, 1, {}, {"block_m": 16, "block_n": 8}),
    "tiles-8x8-splits": (19, 3, 8, False, True, 2, {}, {"block_m": 8, "block_n": 8, "col_splits": 3,
                                                         "row_splits": 2}),
}


@pytest.mark.parametrize("name", list(_MEDIUM))
def test_medium_batches_match_float64_reference(name):
    M, P, dim, normalize, debias, index_mode, shape, overrides = _MEDIUM[name]
    case = make_case(M, P, 2 * dim, seed=len(name), scale=0.6, num_users=11, num_items=13, **shape)
    _compare_float64(case, _options(_similarity(dim, normalize, seed=2), debias), index_mode, seed=1, **overrides)


def test_huge_scores_need_the_max_shift():
    case = make_case(13, 3, 16, seed=5, scale=2.5, num_users=11, num_items=13)
    sim = _similarity(8, False, seed=3)
    options = _options(sim, temperature=0.01)
    with torch.no_grad():
        scores = prepare_scores(inputs_of(case), options)
    assert scores.own_A.abs().max() > 750  # exp overflows float64 without the shift
    _compare_float64(case, options, 1, rtol=1e-9)


@pytest.mark.parametrize("normalize", [False, True])
def test_rows_without_true_negatives(normalize):
    case = all_false_negative_case(P=2, d=16)
    options = _options(_similarity(8, normalize, seed=4))
    with torch.no_grad():
        stats = Kernels(triton_modulated, index_mode=1).negative_statistics(inputs_of(case), case.index, options, 0)
    assert stats.n_item[0] == 0 and stats.n_user[0] == 0 and stats.n_item[1] == 0
    assert torch.isneginf(stats.lse_A[0]) and torch.isneginf(stats.lse_B[0])
    assert torch.isneginf(stats.lse_E[1]) and torch.isfinite(stats.lse_B[1])
    grads = _compare_float64(case, options, 1)
    assert all(torch.isfinite(g).all() for g in grads)


def test_only_the_pools_need_gradients():
    # no row operand and no parameter needs a gradient: only the column-parallel kernel runs
    case = make_case(13, 2, 16, seed=6)
    sim = _similarity(8, False, seed=5).requires_grad_(False)
    options = _options(sim)
    leaves = [e.detach().clone() for e in case.embeddings]
    for t in leaves[2:]:
        t.requires_grad_()
    loss = tm.per_row_loss(inputs_of(case, leaves), case.index, options, 0)
    got = torch.autograd.grad(loss.sum(), leaves[2:])
    ref_leaves = [e.detach().clone().requires_grad_() for e in case.embeddings]
    want = torch.autograd.grad(reference.per_row_loss(inputs_of(case, ref_leaves), case.index, options, 0).sum(),
                               ref_leaves[2:])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradients_are_deterministic():
    case = make_case(13, 3, 16, seed=8)
    options = _options(_similarity(8, True, seed=6))
    upstream = torch.linspace(0.1, 1.9, 13, dtype=torch.float64)
    first = _loss_and_grads(tm, case, options, upstream, case.index)
    second = _loss_and_grads(tm, case, options, upstream, case.index)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


# ---------------------------------------------------------------------------------------------
# The all-ones modulation, the public API, float32
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize,plain", [(False, "dot"), (True, "cosine")])
def test_all_ones_modulation_runs_the_plain_kernels_exactly(normalize, plain):
    case = make_case(13, 2, 16, seed=9)
    options = _options(ModulatedSimilarity.all_ones(8, normalize), reduction="none")
    assert select_backend("triton", torch.device("cpu"), options.similarity.reduce(())[0]) is triton_dot
    leaves = [e.detach().clone().requires_grad_() for e in case.embeddings]
    got = debiased_contrastive_loss(*leaves, *case.ids, interactions=case.index, backend="triton",
                                    **{k: getattr(options, k) for k in ("similarity", "reduction", "temperature",
                                                                       *DEBIASED)})
    halves = [e[..., :8].detach().clone().requires_grad_() for e in case.embeddings]
    want = triton_dot.per_row_loss(inputs_of(case, halves), case.index, _options(plain), 0)
    assert torch.equal(got, want)
    upstream = torch.linspace(-0.5, 1.5, 13, dtype=torch.float64)
    for a, w in zip(torch.autograd.grad(got, leaves, upstream), torch.autograd.grad(want, halves, upstream)):
        assert torch.equal(a[..., :8], w) and not a[..., 8:].any()


def test_public_api_routes_to_the_modulated_kernels():
    case = make_case(13, 3, 16, seed=10)
    sim = _similarity(8, False, seed=7)
    kw = dict(temperature=0.1, reduction="none", **DEBIASED)
    via_api = debiased_contrastive_loss(*case.embeddings, *case.ids, interactions=case.index,
                                        similarity=sim, backend="triton", **kw)
    direct = tm.per_row_loss(inputs_of(case), case.index, _options(sim, **{"reduction": "none"}), 0)
    assert torch.equal(via_api.detach(), direct.detach())
    loss_fn = DebiasedContrastiveLoss(case.index, similarity=sim, backend="triton", **kw)
    torch.testing.assert_close(loss_fn(*case.embeddings, *case.ids), direct)
    want = debiased_contrastive_loss(*case.embeddings, *case.ids, interactions=case.index,
                                     similarity=sim, backend="torch", **kw)
    torch.testing.assert_close(via_api, want, rtol=1e-10, atol=1e-10)


def test_float32_error_is_that_of_the_float32_reference():
    # scores of ~100-200 in fp32 (exp overflows fp32 beyond 88 without the max shift)
    case = make_case(13, 3, 48, seed=7, scale=1.3, num_users=11, num_items=13)
    sim32 = _similarity(24, False, seed=8, dtype=torch.float32)
    options64 = _options(copy.deepcopy(sim32).double())  # the same parameters, exactly
    upstream = torch.rand(13, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    truth, truth_grads = _loss_and_grads(reference, case, options64, upstream, case.index)
    with torch.no_grad():
        assert prepare_scores(inputs_of(case), options64).own_A.abs().max() > 100
    low = case.cast(torch.float32)
    options32 = _options(sim32)
    ref32, ref32_grads = _loss_and_grads(reference, low, options32, upstream, case.index)
    got, got_grads = _loss_and_grads(tm, low, options32, upstream, case.index)
    assert got.dtype == torch.float32 and all(g.dtype == torch.float32 for g in got_grads)
    eps = torch.finfo(torch.float32).eps
    assert_error_within_factor(got, ref32, truth, atol=4 * eps * float(truth.abs().max()), what="loss")
    for name, a, r, t in zip(_GRAD_NAMES, got_grads, ref32_grads, truth_grads):
        assert_error_within_factor(a, r, t, atol=4 * eps * float(t.abs().max()), what=f"d{name}")


# ---------------------------------------------------------------------------------------------
# On a GPU (bench/gpu_check.sh)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("normalize", [False, True])
def test_gpu_float64_matches_reference(normalize):
    case = make_case(300, 4, 2 * 24, seed=11, scale=0.6, num_users=200, num_items=300, device="cuda")
    _compare_float64(case, _options(_similarity(24, normalize, seed=9, device="cuda")), 1, rtol=1e-9)


def test_under_torch_compile():
    # the kernel launches run behind torch.compiler.disable: a graph break, same values
    case = make_case(13, 2, 16, seed=12)
    sim = _similarity(8, False, seed=10)
    options = _options(sim)

    def loss(*embeddings):
        return triton_modulated.per_row_loss(inputs_of(case, embeddings), case.index, options, 0).sum()

    leaves = [e.detach().clone().requires_grad_() for e in case.embeddings]
    compiled = torch.compile(loss, backend="eager", dynamic=False)
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    want = loss(*leaves)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dim,tiles", [(32, (16, 16)), (64, (16, 16)), (100, (16, 8)), (256, (16, 8))])
def test_gpu_pair_tiles_shrink_with_dim(dim, tiles):
    # the backward's layout changes of the flattened pair tiles go through shared memory
    config = triton_modulated.launch_config(4096, 16384, dim, torch.device("cpu"), LaunchOverrides(sm_count=132))
    assert (config.block_m, config.block_n) == tiles and config.block_n >= 8


def test_gpu_launch_refuses_dims_beyond_256_and_auto_takes_the_reference():
    with pytest.raises(ValueError, match="dim=300.*backend='torch'"):
        triton_modulated.launch_config(64, 128, 300, torch.device("cpu"), LaunchOverrides(sm_count=132))
    assert triton_modulated.fits_gpu(ModulatedSimilarity(256))
    assert not triton_modulated.fits_gpu(ModulatedSimilarity(257))
