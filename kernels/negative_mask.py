"""The true-negative masks of a batch, once, as bits: the gather-free mask of the sweep kernels.

The forward and both backward passes of the dot/cosine kernels need, for every (row k, column
j) pair of a tile, whether j ∈ Tᴵ_k (the masks of A and E) and whether j ∈ Tᵁ_k (B and C)
(hdccf_triton/LOSS.md, "False negatives"). Asked inside each sweep (``membership.py``), that is
two random byte gathers from the bitmap of D and about twenty integer instructions per pair, in
each of the three passes, and the masks, born in the gathers' layout, then cross to the
tensor-core layout through shared memory. :func:`true_negative_bits_kernel` answers it once per
batch and packs the answers into bits:

    BI[k, w] bit b = [32·w + b ∈ Tᴵ_k]      BU[k, w] bit b = [32·w + b ∈ Tᵁ_k]

two ``[M, W]`` int32 (the host keeps them as one ``[2, M, W]``), W = ceil(C / 32) + 2 words a
row (C columns: the pool, then the mixed negatives; the last two words pad, so that a tile's
words are read unmasked), bits of columns ≥ C zero; about M·C/4 bytes for both masks (16 MiB at M = 4096,
C = 16,384). It also writes the counts ``CNT [4, M]`` int32: n_item = |Tᴵ_k|, n_user = |Tᵁ_k|,
and (read under ``EXTRA``) n_item_aux, n_user_aux over the pool columns j < n_pool.

The sweep kernels (``MASK_BITS``) then read, per row of a tile of columns [j0, j0 + BLOCK_N),
one to three words (:func:`tile_bits`) and test one bit per pair (:func:`bits_mask`): a
``LOP3`` on a word already in registers instead of a gather.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .membership import true_item_mask, true_user_mask

__all__ = ["true_negative_bits_kernel", "tile_bits", "bits_mask", "column_bits", "low_bits", "popcount"]

_add = tl.standard._sum_combine  # tl.sum's combine function (see negative_stats_fwd.py)


@triton.jit
def popcount(b_x):
    """The set bits of each uint32 of ``b_x`` (SWAR: no popc builtin in Triton's interpreter)."""
    b_x = b_x - ((b_x >> 1) & 0x55555555)
    b_x = (b_x & 0x33333333) + ((b_x >> 2) & 0x33333333)
    b_x = (b_x + (b_x >> 4)) & 0x0F0F0F0F
    return ((b_x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def true_negative_bits_kernel(
    users, items,  # [M] anchor ids (int32 or int64)
    x_ids, y_ids,  # [C] column ids: the flattened pool items and users, then the extras'
    index, n_keys, num_items,  # D (membership.py)
    BI, BU,  # [M, W] int32 out each: the bits of Tᴵ and of Tᵁ (module doc)
    CNT,  # [4, M] int32 out: n_item, n_user over all columns, n_item_aux, n_user_aux over the pool
    M, C, W, P, row_offset,
    n_pool,  # the pool columns N·P (the aux counts run over j < n_pool)
    DEBIAS: tl.constexpr, INDEX_MODE: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # Each program owns BLOCK_M rows and sweeps all W words, BLOCK_W at a time: a tile of
    # [BLOCK_M, BLOCK_W] words, each thread building whole words bit by bit (32 unrolled
    # steps: bit b of word w is column 32·w + b). Per pair only the false-negative test of
    # membership.py runs (identity, and the gather from D under DEBIAS); the parts that depend
    # on the column's position alone, in range (j < C) and outside the row's own block
    # [f_k, f_k + P), are masks of whole words:
    #     keep[k, w] = low(C − 32w) & ~(low(f_k + P − 32w) & ~low(f_k − 32w)),  low(n) = 2^clamp(n, 0, 32) − 1
    # and the counts are popcounts of the finished words (the aux counts of the words & low(n_pool − 32w)).
    i_m = tl.program_id(0)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    m_m = o_m < M
    b_user = tl.load(users + o_m, mask=m_m, other=0)[:, None]  # [BLOCK_M, 1]
    b_item = tl.load(items + o_m, mask=m_m, other=0)[:, None]  # [BLOCK_M, 1]
    b_first = ((row_offset + o_m) * P)[:, None]  # [BLOCK_M, 1] first own column
    m_rows = m_m[:, None]  # [BLOCK_M, 1]
    o_row = o_m.to(tl.int64)[:, None] * W  # [BLOCK_M, 1] the rows' first words
    b_n_item = tl.full([BLOCK_M, BLOCK_W], 0, dtype=tl.int32)  # per-word counts
    b_n_user = tl.full([BLOCK_M, BLOCK_W], 0, dtype=tl.int32)
    b_n_item_pool = tl.full([BLOCK_M, BLOCK_W], 0, dtype=tl.int32)
    b_n_user_pool = tl.full([BLOCK_M, BLOCK_W], 0, dtype=tl.int32)
    for w0 in range(0, W, BLOCK_W):
        o_w = w0 + tl.arange(0, BLOCK_W)  # [BLOCK_W] words
        b_wi = tl.full([BLOCK_M, BLOCK_W], 0, dtype=tl.uint32)  # the words of Tᴵ
        b_wu = tl.full([BLOCK_M, BLOCK_W], 0, dtype=tl.uint32)  # the words of Tᵁ
        for b in tl.static_range(32):
            o_n = o_w * 32 + b  # [BLOCK_W] the column of bit b
            m_n = o_n < C
            b_xid = tl.load(x_ids + o_n, mask=m_n, other=0)[None, :]  # [1, BLOCK_W]
            b_yid = tl.load(y_ids + o_n, mask=m_n, other=0)[None, :]
            # not a false negative (range and own block: below, per word)
            m_item = true_item_mask(m_rows, b_user, b_item, b_xid, index, n_keys, num_items,
                                    DEBIAS, INDEX_MODE, SEARCH_STEPS)  # [BLOCK_M, BLOCK_W]
            m_user = true_user_mask(m_rows, b_user, b_item, b_yid, index, n_keys, num_items,
                                    DEBIAS, INDEX_MODE, SEARCH_STEPS)  # [BLOCK_M, BLOCK_W]
            b_wi |= m_item.to(tl.uint32) << b
            b_wu |= m_user.to(tl.uint32) << b
        o_c = (o_w * 32)[None, :]  # [1, BLOCK_W] the words' first columns
        b_own = low_bits(b_first + P - o_c) & ~low_bits(b_first - o_c)  # [BLOCK_M, BLOCK_W]
        b_keep = low_bits(C - o_c) & ~b_own  # [BLOCK_M, BLOCK_W]
        b_wi &= b_keep
        b_wu &= b_keep
        b_pool = low_bits(n_pool - o_c)  # [1, BLOCK_W]
        b_n_item += popcount(b_wi)
        b_n_user += popcount(b_wu)
        b_n_item_pool += popcount(b_wi & b_pool)
        b_n_user_pool += popcount(b_wu & b_pool)
        m_store = m_rows & (o_w < W)[None, :]
        tl.store(BI + o_row + o_w[None, :], b_wi.to(tl.int32), mask=m_store)
        tl.store(BU + o_row + o_w[None, :], b_wu.to(tl.int32), mask=m_store)
    p_cnt = CNT + o_m
    tl.store(p_cnt, tl.reduce(b_n_item, 1, _add), mask=m_m)
    tl.store(p_cnt + M, tl.reduce(b_n_user, 1, _add), mask=m_m)
    tl.store(p_cnt + 2 * M, tl.reduce(b_n_item_pool, 1, _add), mask=m_m)
    tl.store(p_cnt + 3 * M, tl.reduce(b_n_user_pool, 1, _add), mask=m_m)


@triton.jit
def _funnel(b_w0, b_w1, s):
    """Bits s .. s + 31 of the 64-bit word (w1 : w0), s in [0, 32), uint32 (no shift by 32:
    the high word moves by 31 − s, then 1)."""
    return (b_w0 >> s) | ((b_w1 << (31 - s)) << 1)


@triton.jit
def low_bits(n):
    """uint32 with the low min(max(n, 0), 32) bits set (in int64: no shift by 32 of a uint32)."""
    return tl.cast((1 << tl.cast(tl.minimum(tl.maximum(n, 0), 32), tl.int64)) - 1, tl.uint32)


@triton.jit
def tile_bits(p_words, m_rows, j0, col_end, BLOCK_N: tl.constexpr):
    """The bits of columns [j0, min(j0 + BLOCK_N, col_end)) of each row: ``(lo, hi)`` ``[rows]``
    uint32, bit c of lo column j0 + c (c < 32), bit c of hi column j0 + 32 + c (BLOCK_N = 64;
    hi = lo, unused, for BLOCK_N ≤ 32); columns from col_end on, and rows off ``m_rows``, 0.

    p_words: ``[rows]`` pointers to each row's first word of one mask (BI + k·W or BU + k·W). Per row
    and tile: two or three word loads and a funnel shift, whatever j0's alignment (the splits
    of the columns need not start on a word)."""
    q = j0 >> 5
    s = tl.cast(j0 & 31, tl.uint32)  # (a cast, not .to: j0 is a Python int in the interpreter)
    b_w0 = tl.load(p_words + q, mask=m_rows, other=0).to(tl.uint32)  # [rows]
    b_w1 = tl.load(p_words + q + 1, mask=m_rows, other=0).to(tl.uint32)  # (W ≥ ceil(C/32) + 2: in range)
    n = col_end - j0  # columns of the tile in range (≥ 1)
    b_lo = _funnel(b_w0, b_w1, s) & low_bits(n)
    if BLOCK_N > 32:
        b_w2 = tl.load(p_words + q + 2, mask=m_rows, other=0).to(tl.uint32)
        b_hi = _funnel(b_w1, b_w2, s) & low_bits(n - 32)
    else:
        b_hi = b_lo
    return b_lo, b_hi


@triton.jit
def column_bits(BLOCK_N: tl.constexpr):
    """``[BLOCK_N]`` uint32 2^(c mod 32): the bit of tile column c in its word of
    :func:`tile_bits` (loop-invariant: computed once, before the sweep)."""
    o_c = tl.arange(0, BLOCK_N)
    return (tl.full([BLOCK_N], 1, dtype=tl.uint32) << (o_c & 31).to(tl.uint32))


@triton.jit
def bits_mask(b_lo, b_hi, b_bit, BLOCK_N: tl.constexpr):
    """The mask ``[rows, BLOCK_N]`` of a tile from its rows' bits (:func:`tile_bits`) and the
    columns' bits ``b_bit`` (:func:`column_bits`): one AND-and-test per pair."""
    if BLOCK_N > 32:
        o_c = tl.arange(0, BLOCK_N)
        b_word = tl.where((o_c < 32)[None, :], b_lo[:, None], b_hi[:, None])  # [rows, BLOCK_N]
    else:
        b_word = b_lo[:, None]  # [rows, 1]
    return (b_word & b_bit[None, :]) != 0
