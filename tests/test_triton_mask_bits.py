"""The gather-free masks: Tᴵ and Tᵁ computed once per batch as bits (``kernels/negative_mask.py``)
and read by the forward and both backward passes, against the reference's masks and against the
passes that gather the masks from D themselves.

In Triton's CPU interpreter on tiny float64 batches: P = 3, so that own blocks straddle the
32-column words; forced column splits that start off a word; mixed negatives, whose splits start
at n_pool (off a word); the sorted-keys index, no index, no debiasing; rows whose negatives are
all false negatives. The two paths see the same masks, so their results must agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import hdccf_triton.backends.reference as reference  # noqa: E402
import hdccf_triton.backends._triton_runtime as runtime  # noqa: E402
import hdccf_triton.backends.triton_dot as triton_dot  # noqa: E402
from hdccf_triton.options import LossOptions  # noqa: E402
from hdccf_triton.terms import ExtraNegatives  # noqa: E402
from test_triton_logq_mixed import _compare, _extras  # noqa: E402
from triton_helpers import Kernels, all_false_negative_case, loss_and_grads, make_case, use_triton_mode  # noqa: E402


@pytest.fixture(autouse=True)
def _triton_mode(request, monkeypatch):
    use_triton_mode(request, monkeypatch)


def _unpack(words: torch.Tensor, C: int) -> torch.Tensor:
    """``[M, W]`` int32 words → ``[M, C]`` bool (bit b of word w is column 32·w + b)."""
    bits = (words.to(torch.int64)[..., None] >> torch.arange(32)) & 1
    return bits.reshape(words.shape[0], -1)[:, :C].bool()


def _bits_and_counts(case, debias, index_mode, extra=None):
    """The bits' kernel on the case's ids (and the extras'): bits [2, M, W], counts [4, M]."""
    users, items, pool_items, pool_users = case.ids
    n_pool = pool_items.numel()
    x_ids, y_ids = pool_items.reshape(-1), pool_users.reshape(-1)
    if extra is not None:
        x_ids, y_ids = torch.cat([x_ids, extra.items]), torch.cat([y_ids, extra.users])
    interactions = case.index if index_mode != 0 else None
    layout = runtime.index_layout(interactions, debias, torch.device("cpu"), index_mode or None)
    ids = runtime.kernel_ids((users, items, x_ids, y_ids), case.index)
    M, C = users.shape[0], x_ids.shape[0]
    W = runtime.cdiv(C, 32) + 2
    bits = torch.full((2, M, W), -(2**31), dtype=torch.int32)  # poisoned: every word must be written
    counts = torch.full((4, M), -(2**31), dtype=torch.int32)
    runtime.load_kernels().negative_mask.true_negative_bits_kernel[(runtime.cdiv(M, 16),)](
        *ids, layout.tensor, layout.n_keys, layout.num_items, bits[0], bits[1], counts,
        M, C, W, pool_items.shape[1], case.row_offset, n_pool,
        DEBIAS=debias, INDEX_MODE=layout.mode, SEARCH_STEPS=layout.search_steps, BLOCK_M=16, BLOCK_W=1,
    )
    return bits, counts, interactions, C, n_pool


@pytest.mark.parametrize("debias,index_mode", [(True, 1), (True, 2), (True, 0), (False, 1)])
@pytest.mark.parametrize("B", [0, 37])
def test_bits_are_the_reference_masks(debias, index_mode, B):
    case = make_case(21, 3, 4, N=26, row_offset=3, seed=5)  # C = 78 (+ 37): three and four words
    extra = None
    if B:
        _, (items, users) = _extras(case, B, seed=2, scale=0.5)
        extra = ExtraNegatives(torch.zeros(B, 4), torch.zeros(B, 4), items, users)
    bits, counts, interactions, C, n_pool = _bits_and_counts(case, debias, index_mode, extra)
    want_item, want_user = reference.true_negative_masks(case.ids, interactions, debias, case.row_offset,
                                                         extra=extra)
    got_item, got_user = _unpack(bits[0], C), _unpack(bits[1], C)
    assert torch.equal(got_item, want_item)
    assert torch.equal(got_user, want_user)
    # the bits past column C (and the two padding words) are zero
    assert torch.equal(_unpack(bits[0], bits.shape[2] * 32)[:, C:].any(1), torch.zeros(case.M, dtype=torch.bool))
    assert torch.equal(_unpack(bits[1], bits.shape[2] * 32)[:, C:].any(1), torch.zeros(case.M, dtype=torch.bool))
    assert counts[0].tolist() == want_item.sum(1).tolist()
    assert counts[1].tolist() == want_user.sum(1).tolist()
    assert counts[2].tolist() == want_item[:, :n_pool].sum(1).tolist()
    assert counts[3].tolist() == want_user[:, :n_pool].sum(1).tolist()


def _options(similarity="dot", debias=True):
    return LossOptions(similarity=similarity, debias=debias, temperature=0.1, omega_user=0.2, omega_item=0.3,
                       lambda_user=0.7, lambda_item=1.3)


@pytest.mark.parametrize("mask_bits", [True, False])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_both_paths_match_the_reference_with_unaligned_splits(mask_bits, similarity):
    # three column splits of the pool (16 columns each: none starts on a word but the first),
    # then the extras' splits from n_pool = 66 on; two row splits in the column pass
    case = make_case(22, 3, 8, N=22, seed=11)
    _compare(case, _options(similarity), B=20, seed=4, mask_bits=mask_bits, col_splits=3, row_splits=2)


@pytest.mark.parametrize("mask_bits", [True, False])
def test_rows_without_true_negatives(mask_bits):
    _compare(all_false_negative_case(P=3), _options(), B=0, log_q=None, mask_bits=mask_bits)


@pytest.mark.parametrize("debias,index_mode", [(True, 1), (True, 2), (False, None)])
def test_the_two_paths_agree_bit_for_bit(debias, index_mode):
    case = make_case(19, 3, 8, N=23, row_offset=2, seed=3)
    g = torch.Generator().manual_seed(1)
    upstream = torch.rand(case.M, generator=g, dtype=torch.float64) * 2 - 0.5
    runs = []
    for mask_bits in (True, False):
        kern = Kernels(triton_dot, mask_bits=mask_bits, index_mode=index_mode, col_splits=2)
        runs.append(loss_and_grads(kern, case, _options(debias=debias), upstream))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)


def test_the_bits_are_used_while_they_fit():
    limit = triton_dot.MASK_BITS_MAX_BYTES
    C = 16384
    rows = limit // (2 * 4 * (C // 32 + 2))  # the most rows whose bits fit
    assert triton_dot.uses_mask_bits(rows, C)
    assert not triton_dot.uses_mask_bits(rows + 1, C)
    assert not triton_dot.uses_mask_bits(8, 64, runtime.LaunchOverrides(mask_bits=False))
    assert triton_dot.uses_mask_bits(rows + 1, C, runtime.LaunchOverrides(mask_bits=True))
