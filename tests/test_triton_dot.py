"""The fused Triton kernels against the PyTorch reference.

On a machine without a GPU they run in Triton's CPU interpreter: an autouse fixture sets
``TRITON_INTERPRET=1`` for each test (not for the whole session), the backend reloads the
kernel modules for the current setting (``@triton.jit`` reads it when a module is executed),
and the kernels call Triton builtins only (not ``tl.sum``/``tl.max``/``tl.zeros``, which are
themselves jitted when triton is first imported, maybe before the variable was set), so this
module runs in one pytest process with any other, in any order, whoever imported triton
first. Every output buffer is NaN-filled before the kernels write it
(``LaunchOverrides(poison_outputs=True)``, through ``triton_helpers.Kernels``), so a tile a
kernel forgets to write fails the comparison.

Interpreter tests use tiny shapes (16×16 tiles; the interpreter is slow), float64 for tight
comparisons with the float64 reference, and float32 compared with the float32 reference's own
error (cut-cross-entropy style). Tests marked ``gpu`` run on CUDA (``bench/gpu_check.sh``).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

import hdccf_triton.backends._triton_runtime as runtime  # noqa: E402
import hdccf_triton.backends.reference as reference  # noqa: E402
import hdccf_triton.backends.triton_dot as triton_dot  # noqa: E402
from hdccf_triton import InteractionIndex, debiased_contrastive_loss  # noqa: E402
from hdccf_triton.options import LossOptions  # noqa: E402
from hdccf_triton.terms import LossInputs, prepare_scores  # noqa: E402
from triton_helpers import (  # noqa: E402
    Case,
    Kernels,
    all_false_negative_case,
    assert_error_within_factor,
    inputs_of,
    loss_and_grads,
    make_case,
    use_triton_mode,
)

#: the dot/cosine kernels with every output buffer NaN-poisoned
tb = Kernels(triton_dot)

DEBIASED = dict(omega_user=0.2, omega_item=0.3, lambda_user=0.7, lambda_item=1.3)


@pytest.fixture(autouse=True)
def _triton_mode(request, monkeypatch):
    use_triton_mode(request, monkeypatch)


def _options(similarity="dot", debias=True, temperature=0.1, **kw):
    extra = DEBIASED if debias else {}
    return LossOptions(similarity=similarity, debias=debias, temperature=temperature, **{**extra, **kw})


def _kernels_for(index_mode, **overrides):
    """The kernels reading D as a bitmap (1) or sorted keys (2); None: no index at all."""
    return Kernels(triton_dot, index_mode=index_mode, **overrides)


def _compare_float64(case: Case, options, index_mode, *, seed=0, rtol=1e-10, **overrides):
    """Statistics, per-row loss and the four gradients, kernel vs reference, both in float64."""
    index = None if index_mode is None else case.index  # None: identity false negatives only
    kern = _kernels_for(index_mode, **overrides)
    g = torch.Generator().manual_seed(seed)
    upstream = torch.rand(case.M, generator=g, dtype=torch.float64) * 2 - 0.5

    # the scores and statistics themselves (lse −inf where a row has no true negative; exact counts)
    with torch.no_grad():
        rest = (index, options, case.row_offset)
        got_scores, got = kern.fused_scores(inputs_of(case, triton_dot.kernel_inputs(*case.embeddings)), *rest)
        want_scores = prepare_scores(inputs_of(case), options, case.row_offset)
        want = reference.negative_statistics(inputs_of(case, want_scores[:4]), *rest)  # normalised for cosine
    for name in ("s", "own_A", "own_B", "own_C", "own_E"):
        a, b = getattr(got_scores, name), getattr(want_scores, name)
        assert a.dtype == torch.float64 and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol, msg=name)
    assert torch.equal(got.n_item, want.n_item) and torch.equal(got.n_user, want.n_user)
    for name in ("lse_A", "lse_B", "lse_C", "lse_E"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == torch.float64
        assert torch.equal(torch.isneginf(a), torch.isneginf(b)), name
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol, msg=name)

    loss, grads = loss_and_grads(kern, case, options, upstream, index=index)
    loss_ref, grads_ref = loss_and_grads(reference, case, options, upstream, index=index)
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=rtol)
    for name, a, b in zip(("user", "item", "pool_item", "pool_user"), grads, grads_ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=f"d{name}_emb")


# ---------------------------------------------------------------------------------------------
# float64 against the float64 reference
# ---------------------------------------------------------------------------------------------

_SMALL = [
    (M, P, d, sim, debias, mode)
    for M, P, d, sim, debias, mode in itertools.product(
        (1, 2), (1, 3), (8, 24), ("dot", "cosine"), (True, False), (None, 1, 2)
    )
    if debias or mode == 1  # without debias the index is never read
]


@pytest.mark.parametrize("M,P,d,similarity,debias,index_mode", _SMALL)
def test_tiny_batches_match_float64_reference(M, P, d, similarity, debias, index_mode):
    case = make_case(M, P, d, seed=M * 100 + P * 10 + d, scale=0.8)
    _compare_float64(case, _options(similarity, debias), index_mode)


_MEDIUM = {
    # name: (P, d, similarity, debias, index_mode, extra make_case args, launch overrides)
    "dot-bitmap": (3, 24, "dot", True, 1, {}, {}),
    "cosine-sorted": (3, 8, "cosine", True, 2, {}, {}),
    "cosine-biased": (1, 24, "cosine", False, 1, {}, {}),
    "dot-sorted-splits": (3, 24, "dot", True, 2, {}, {"col_splits": 3, "row_splits": 2}),
    "row-offset-N>M": (1, 8, "dot", True, 1, {"N": 45, "row_offset": 5}, {"col_splits": 2}),
    "cosine-row-offset-32x16-tiles": (3, 8, "cosine", True, 2, {"N": 40, "row_offset": 3},
                                      {"block_m": 32, "row_splits": 2}),
    "no-index-splits": (3, 8, "dot", True, None, {}, {"col_splits": 4, "row_splits": 3}),
}


@pytest.mark.parametrize("name", list(_MEDIUM))
def test_batches_of_37_rows_match_float64_reference(name):
    P, d, similarity, debias, index_mode, shape, overrides = _MEDIUM[name]
    case = make_case(37, P, d, seed=len(name), scale=0.6, num_users=11, num_items=13, **shape)
    _compare_float64(case, _options(similarity, debias), index_mode, seed=1, **overrides)


def test_huge_scores_need_the_max_shift():
    # |scores| up to ~1000: exp overflows even float64 without the per-row max shift
    case = make_case(37, 3, 24, seed=5, scale=2.2, num_users=11, num_items=13)
    U, _, X, _ = case.embeddings
    scores = U @ X.reshape(-1, 24).T / 0.05
    assert scores.abs().max() > 750
    _compare_float64(case, _options("dot", temperature=0.05), 1, rtol=1e-9)


@pytest.mark.parametrize("index_mode", [1, 2])
def test_rows_without_true_negatives(index_mode):
    case = all_false_negative_case(P=2, d=8)
    with torch.no_grad():
        stats = _kernels_for(index_mode).negative_statistics(inputs_of(case), case.index, _options(), 0)
    assert stats.n_item[0] == 0 and stats.n_user[0] == 0 and stats.n_item[1] == 0
    assert torch.isneginf(stats.lse_A[0]) and torch.isneginf(stats.lse_C[0])
    assert torch.isneginf(stats.lse_E[1]) and torch.isfinite(stats.lse_B[1])
    _compare_float64(case, _options(), index_mode)
    _, grads = loss_and_grads(tb, case, _options(), index=case.index)
    assert all(torch.isfinite(g).all() for g in grads)


def test_single_row_and_single_block():
    # M = N = 1: no negatives at all (Q = 0); every lse is −inf, the loss is 0, grads finite
    case = make_case(1, 2, 8, seed=9)
    loss, grads = loss_and_grads(tb, case, _options(), index=case.index)
    assert loss.tolist() == [0.0]
    assert all(torch.isfinite(g).all() for g in grads)


def test_only_some_inputs_need_gradients():
    case = make_case(20, 2, 8, seed=4)
    leaves = [e.detach().clone() for e in case.embeddings]
    leaves[0].requires_grad_()  # only the user embeddings: the column pass is skipped
    loss = tb.per_row_loss(inputs_of(case, leaves), case.index, _options(), 0)
    (got,) = torch.autograd.grad(loss.sum(), leaves[0])
    _, want = loss_and_grads(reference, case, _options())
    torch.testing.assert_close(got, want[0], rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# float32 and half precision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_float32_error_is_that_of_the_float32_reference(similarity):
    # scores of a few hundred in fp32 (exp overflows fp32 beyond 88 without the max shift)
    scale, tau = (1.6, 0.1) if similarity == "dot" else (0.6, 0.01)
    case = make_case(37, 3, 24, seed=7, scale=scale, num_users=11, num_items=13)
    options = _options(similarity, temperature=tau)
    upstream = torch.rand(37, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    truth, truth_grads = loss_and_grads(reference, case, options, upstream)
    low = case.cast(torch.float32)
    ref32, ref32_grads = loss_and_grads(reference, low, options, upstream)
    got, got_grads = loss_and_grads(tb, low, options, upstream)
    assert got.dtype == torch.float32 and all(g.dtype == torch.float32 for g in got_grads)
    if similarity == "dot":
        U, _, X, _ = case.embeddings
        assert (U @ X.reshape(-1, 24).T / tau).abs().max() > 150
    eps = torch.finfo(torch.float32).eps
    assert_error_within_factor(got, ref32, truth, atol=4 * eps * float(truth.abs().max()), what="loss")
    for name, a, r, t in zip(("user", "item", "pool_item", "pool_user"), got_grads, ref32_grads, truth_grads):
        assert_error_within_factor(a, r, t, atol=4 * eps * float(t.abs().max()), what=f"d{name}_emb")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_half_precision_inputs(dtype, similarity):
    # fp32 accumulation; the softmax weights are rounded to the input dtype for the gradient
    # products (as in flash attention), so gradients agree to about the dtype's resolution
    case = make_case(20, 2, 24, seed=8, scale=0.4).cast(dtype)
    options = _options(similarity)
    loss, grads = loss_and_grads(tb, case, options)
    assert loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    truth, truth_grads = loss_and_grads(reference, case.cast(torch.float64), options)
    low, low_grads = loss_and_grads(reference, case, options)  # the reference on the same inputs
    res = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)
    if similarity == "dot":  # same input values, fp32 accumulation both: the fp32 reference's error
        assert_error_within_factor(loss, low, truth, atol=1e-5 * float(truth.abs().max()), what="loss")
    else:  # the kernels read the normalised embeddings rounded to the input dtype
        torch.testing.assert_close(loss.double(), truth, rtol=0, atol=40 * res * float(truth.abs().max()))
    for a, t in zip(grads, truth_grads):
        torch.testing.assert_close(a.double(), t, rtol=0, atol=8 * res * float(t.abs().max()))


def test_autocast_feeds_the_kernels_in_the_autocast_dtype():
    case = make_case(20, 2, 16, seed=12, scale=0.4).cast(torch.float32)
    options = _options()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(tb, case, options)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    want, want_grads = loss_and_grads(reference, case, options)
    scale = float(want.abs().max())
    torch.testing.assert_close(loss, want, rtol=0, atol=0.05 * scale)
    for a, t in zip(grads, want_grads):
        torch.testing.assert_close(a, t, rtol=0, atol=0.05 * float(t.abs().max()))


# ---------------------------------------------------------------------------------------------
# Memory, determinism, plumbing
# ---------------------------------------------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces: elements, and bytes of uint8 tensors.

    Triton's interpreter copies each kernel argument's storage to the host as a uint8 tensor
    (``aten.set_`` / ``copy_`` of the storage bytes); those are counted apart, in bytes.
    """

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                if t.dtype == torch.uint8:
                    self.largest_bytes = max(self.largest_bytes, t.numel())
                else:
                    self.largest = max(self.largest, t.numel())
        return out


def test_no_score_matrix_is_materialised():
    M, P, d = 48, 2, 8
    case = make_case(M, P, d, seed=13)
    options = _options("cosine")
    with _LargestTensor() as probe:
        loss_and_grads(tb, case, options)
    # the inputs have N·P·d = 768 entries; one score matrix M·N·P = 4608 (36864 bytes)
    assert probe.largest <= 2 * M * P * d, probe.largest
    assert probe.largest_bytes <= 8 * 2 * M * P * d, probe.largest_bytes
    with _LargestTensor() as probe_ref:  # the detector sees the reference's [M, N·P] matrices
        loss_and_grads(reference, case, options)
    assert probe_ref.largest >= M * M * P


@pytest.mark.parametrize("mask_bits", [True, False])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_peak_memory_is_the_gradients(similarity, mask_bits):
    # bf16, in the interpreter: above the inputs, the Triton path holds the gradients (as
    # large as the inputs) and O(M·P) scores and statistics, nothing of shape [N, P, d] more;
    # with the masks as bits, also those bits (2·M·(ceil(N·P/32) + 2) int32) and their counts
    harness = _bench_harness()
    M, P, d = 40, 4, 32
    case = make_case(M, P, d, seed=17).cast(torch.bfloat16)
    leaves = [e.detach().clone().requires_grad_() for e in case.embeddings]
    case.index.bitmap()  # built once, outside the measurement
    inputs = sum(e.numel() * e.element_size() for e in leaves)
    with harness.LiveBytes(preexisting=[*leaves, *case.ids], ignore=(torch.uint8,)) as probe:
        loss = triton_dot.per_row_loss(inputs_of(case, leaves), case.index, _options(similarity), 0,
                                       overrides=runtime.LaunchOverrides(mask_bits=mask_bits))
        torch.autograd.grad(loss.sum(), leaves)
    per_row = 8 * (4 * P + 8)  # 8 bytes per row for each of the [4, M, P] scores and [8, M] statistics
    if similarity == "cosine":
        per_row += 4 * (2 + 2 * P)  # fp32 inverse norms of U, I, X, Y
    if mask_bits:
        per_row += 2 * 4 * (-(-M * P // 32) + 2) + 4 * (4 + 8)  # the bits, the counts (int32, then int64)
    assert probe.peak <= inputs + M * per_row, (probe.peak, inputs, M * per_row)
    # one fp32 [N, P, d] temporary (what the own-block scores cost in PyTorch) would not fit
    assert M * P * d * 4 > M * per_row


def test_cosine_with_a_zero_embedding():
    # the kernels normalise on the fly: e / max(‖e‖, ε), whose gradient is g/ε for a zero row
    case = make_case(20, 2, 8, seed=18, scale=0.6)
    for t, row in zip(case.embeddings, (3, 5, 7, 11)):
        t.view(-1, 8)[row] = 0.0
    _compare_float64(case, _options("cosine"), 1)


def _bench_harness():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "harness.py"
    spec = importlib.util.spec_from_file_location("hdccf_bench_harness", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_same_inputs_same_bits():
    kern = Kernels(triton_dot, col_splits=2, row_splits=2)
    case = make_case(37, 1, 8, seed=14, scale=0.7).cast(torch.float32)
    runs = [loss_and_grads(kern, case, _options()) for _ in range(2)]
    (l1, g1), (l2, g2) = runs
    assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_public_api_backend_triton_matches_torch():
    case = make_case(9, 2, 8, seed=15)
    tensors = (*case.embeddings, *case.ids)
    kw = dict(interactions=case.index, omega_user=0.1, similarity="cosine")
    for reduction in ("mean", "sum", "none"):
        got = debiased_contrastive_loss(*tensors, backend="triton", reduction=reduction, **kw)
        want = debiased_contrastive_loss(*tensors, backend="torch", reduction=reduction, **kw)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_under_torch_compile():
    # the kernels run behind a graph break; the rest of the loss is traced
    case = make_case(9, 2, 8, seed=16)
    compiled = torch.compile(triton_dot.per_row_loss, backend="eager", dynamic=False)
    got, grads = loss_and_grads(type("B", (), {"per_row_loss": staticmethod(compiled)}), case, _options())
    want, want_grads = loss_and_grads(reference, case, _options())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_unavailable_reason(monkeypatch):
    assert runtime.unavailable_reason(torch.device("cpu")) is None  # interpreter on CPU tensors
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1" in runtime.unavailable_reason(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "CPU tensors only" in runtime.unavailable_reason(torch.device("cuda"))
    # a checkout on PYTHONPATH, not installed: no hdccf_triton.kernels (kernels/ lies beside the package)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "hdccf_triton.kernels" else real(name, *a))
    assert "pip install -e ." in runtime.unavailable_reason(torch.device("cpu"))


def test_kernels_follow_the_interpreter_setting(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.delenv("TRITON_INTERPRET")
    compiled = runtime.load_kernels()  # decorating needs no GPU
    assert not isinstance(compiled.negative_stats_fwd.negative_stats_fwd_kernel, InterpretedFunction)
    assert not isinstance(compiled.modulated_bwd.modulated_stats_bwd_cols_kernel, InterpretedFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted = runtime.load_kernels()
    for fn in (interpreted.negative_stats_fwd.negative_stats_fwd_kernel,
               interpreted.negative_stats_bwd.negative_stats_bwd_rows_kernel,
               interpreted.negative_stats_bwd.negative_stats_bwd_cols_kernel, interpreted.membership.index_contains,
               interpreted.modulated_fwd.modulated_stats_fwd_kernel,
               interpreted.modulated_bwd.modulated_stats_bwd_cols_kernel):
        assert isinstance(fn, InterpretedFunction)


@pytest.mark.parametrize("index_mode", [1, 2])
@pytest.mark.parametrize("n_pairs", [1, 2, 3, 4, 7, 8, 9, 40, 64])
def test_membership_lookup_matches_the_index(index_mode, n_pairs):
    num_users, num_items = 9, 11
    g = torch.Generator().manual_seed(n_pairs)
    keys = torch.randperm(num_users * num_items, generator=g)[:n_pairs]
    if n_pairs >= 3:  # the first and the last key of the id space
        keys[0], keys[1] = 0, num_users * num_items - 1
    index = InteractionIndex.from_pairs(keys // num_items, keys % num_items, num_users, num_items)
    layout = runtime.index_layout(index, True, torch.device("cpu"), index_mode)
    assert layout.mode == index_mode
    qu, qi = torch.meshgrid(torch.arange(num_users), torch.arange(num_items), indexing="ij")
    qu, qi = qu.reshape(-1).contiguous(), qi.reshape(-1).contiguous()
    out = torch.full((qu.numel(),), -1, dtype=torch.int8)
    runtime.load_kernels().membership.membership_probe_kernel[(runtime.cdiv(qu.numel(), 32),)](
        qu, qi, out, layout.tensor, layout.n_keys, layout.num_items, qu.numel(),
        INDEX_MODE=layout.mode, SEARCH_STEPS=layout.search_steps, BLOCK=32,
    )
    assert torch.equal(out.bool(), index.contains(qu, qi))


def test_row_bitmap_matches_the_index():
    # INDEX_MODE 1 reads D as one row of ceil(num_items / 8) bytes per user (kernels/membership.py)
    case = make_case(5, 2, 8, num_users=7, num_items=13, density=0.4, seed=5)
    index = case.index
    rowmap = index.row_bitmap()
    assert rowmap is index.row_bitmap() and rowmap.dtype == torch.uint8  # made once per index
    nb = (index.num_items + 7) // 8
    assert rowmap.numel() == index.num_users * nb
    u, i = torch.meshgrid(torch.arange(index.num_users), torch.arange(index.num_items), indexing="ij")
    bits = (rowmap.long()[u * nb + (i >> 3)] >> (i & 7)) & 1
    assert torch.equal(bits.bool(), index.contains(u.reshape(-1), i.reshape(-1)).view(u.shape))


def test_launch_config_on_cpu():
    for d, block_d in ((1, 16), (8, 16), (24, 32), (64, 64), (200, 256), (256, 256)):
        assert triton_dot.launch_config(37, 111, d, torch.device("cpu")).block_d == block_d
    overrides = runtime.LaunchOverrides(block_m=32, col_splits=3, row_splits=2)
    c = triton_dot.launch_config(37, 111, 8, torch.device("cpu"), overrides=overrides)
    assert (c.fwd.block_m, c.fwd.block_n, c.fwd.splits) == (32, 16, 3)
    assert (c.rows.splits, c.cols.splits, c.cols.block_m) == (3, 2, 32)
    assert runtime.split_size(111, 3, 16) == (48, 3)
    assert runtime.split_size(111, 100, 16) == (16, 7)
    assert runtime.split_size(5, 4, 16) == (16, 1)


def test_launch_config_replays_a_gpu_on_the_cpu():
    # sm_count takes the GPU branch without a GPU: the H100's 132 SMs at M = 4096, P = 4, d = 64
    c = triton_dot.launch_config(4096, 16384, 64, torch.device("cpu"), torch.bfloat16,
                                 runtime.LaunchOverrides(sm_count=132))
    assert c.num_stages == 2 and (c.fwd.block_m, c.fwd.block_n, c.fwd.num_warps) == triton_dot._GPU_TILES[64][0]
    assert c.fwd.splits == 3  # ceil(132 SMs / 64 row blocks)
    gather = triton_dot.launch_config(4096, 16384, 64, torch.device("cpu"), torch.bfloat16,
                                      runtime.LaunchOverrides(sm_count=132), mask_bits=False)
    assert (gather.fwd.block_m, gather.fwd.block_n) == triton_dot._GPU_TILES_GATHER[64][0][:2]
    # the masks' bits are the default at this shape (2·4096·514 words: 16 MiB)
    assert triton_dot.uses_mask_bits(4096, 16384)


def test_gpu_tile_tables_are_valid_for_tl_dot():
    for tiles in (*triton_dot._GPU_TILES.values(), *triton_dot._GPU_TILES_GATHER.values(),
                  *triton_dot._GPU_TILES_FMA.values(), *triton_dot._GPU_TILES_FMA_BITS.values()):
        for block_m, block_n, warps in tiles:
            assert block_m >= 16 and block_n >= 16 and warps in (4, 8)
            assert block_m & (block_m - 1) == 0 and block_n & (block_n - 1) == 0


# ---------------------------------------------------------------------------------------------
# On a GPU (bench/gpu_check.sh)
# ---------------------------------------------------------------------------------------------


def _gpu_case(M, P, d, dtype, *, seed=0, num_users=6040, num_items=3416, density=0.02):
    return make_case(M, P, d, seed=seed, scale=0.3, dtype=dtype, num_users=num_users,
                     num_items=num_items, density=density, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_gpu_matches_reference(dtype, similarity):
    case = _gpu_case(1024, 4, 64, dtype, seed=1)
    options = _options(similarity)
    upstream = torch.rand(case.M, device=case.embeddings[0].device, dtype=torch.float64)
    truth, truth_grads = loss_and_grads(reference, case.cast(torch.float64), options, upstream)
    got, got_grads = loss_and_grads(tb, case, options, upstream)
    low, low_grads = loss_and_grads(reference, case, options, upstream)
    eps = torch.finfo(torch.float32).eps
    if dtype == torch.float32 or similarity == "dot":
        assert_error_within_factor(got, low, truth, atol=16 * eps * float(truth.abs().max()), what="loss")
    res = {torch.float32: 2.0**-20, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    for a, r, t in zip(got_grads, low_grads, truth_grads):
        assert a.dtype == dtype
        if dtype == torch.float32:
            assert_error_within_factor(a, r, t, atol=16 * eps * float(t.abs().max()), what="grad")
        else:
            torch.testing.assert_close(a.double(), t, rtol=0, atol=16 * res * float(t.abs().max()))


@pytest.mark.gpu
def test_gpu_float64_matches_reference():
    case = _gpu_case(300, 2, 24, torch.float64, seed=2, num_users=50, num_items=60, density=0.2)
    opts = _options("dot")
    got, got_grads = loss_and_grads(tb, case, opts)
    want, want_grads = loss_and_grads(reference, case, opts)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * max(1.0, float(b.abs().max())))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_bit_identical_runs(dtype):
    case = _gpu_case(4096, 4, 64, dtype, seed=3)
    runs = [loss_and_grads(tb, case, _options()) for _ in range(3)]
    for loss, grads in runs[1:]:
        assert torch.equal(loss, runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))


@pytest.mark.gpu
def test_gpu_peak_memory_is_linear_in_the_batch():
    M, P, d = 8192, 4, 64
    case = _gpu_case(M, P, d, torch.bfloat16, seed=4)
    case.index.bitmap()  # built once, outside the measurement
    leaves = [e.detach().clone().requires_grad_() for e in case.embeddings]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = triton_dot.per_row_loss(inputs_of(case, leaves), case.index, _options(), 0)
    torch.autograd.grad(loss.sum(), leaves)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # the gradients themselves (1× the inputs), the row pass's fp32 partial gradients (freed
    # before the column pass, and never larger than the pool gradients it allocates) and O(M·P)
    # statistics: `python bench/memory_replay.py` replays this on the CPU as ≈ 1.34× the inputs
    inputs = sum(e.numel() * e.element_size() for e in leaves)
    assert extra < 2 * inputs, (extra, inputs)
    score_matrix = M * M * P * 4  # one fp32 [M, N·P] matrix: 1 GiB
    assert extra < score_matrix / 8, (extra, score_matrix)


@pytest.mark.gpu
def test_gpu_largest_batch_smoke():
    # M = 65536 rows, P = 16: 1M pool columns, 6.9e10 (row, column) pairs per score matrix
    M, P, d = 65536, 16, 64
    case = _gpu_case(M, P, d, torch.bfloat16, seed=5)
    loss, grads = loss_and_grads(tb, case, _options())
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    rows = 8  # the first rows against the reference (their own blocks are blocks 0..7)
    emb = [e.detach() for e in case.embeddings]
    ids = (case.ids[0][:rows], case.ids[1][:rows], case.ids[2], case.ids[3])
    first = (emb[0][:rows], emb[1][:rows], emb[2], emb[3])
    with torch.no_grad():
        got = tb.negative_statistics(LossInputs(*first, *ids), case.index, _options(), 0)
        want = reference.negative_statistics(LossInputs(*(e.float() for e in first), *ids), case.index, _options(), 0)
    assert torch.equal(got.n_item, want.n_item) and torch.equal(got.n_user, want.n_user)
    for name in ("lse_A", "lse_B", "lse_C", "lse_E"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gpu_autocast():
    case = _gpu_case(1024, 4, 64, torch.float32, seed=6)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(tb, case, _options())
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    want, _ = loss_and_grads(reference, case, _options())
    torch.testing.assert_close(loss, want, rtol=0, atol=0.02 * float(want.abs().max()))


@pytest.mark.gpu
def test_gpu_auto_backend_is_triton():
    from hdccf_triton.loss import select_backend

    assert select_backend("auto", torch.device("cuda")) is triton_dot
